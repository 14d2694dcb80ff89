"""Recipes: every setting of a run, validated, with one-way precedence.

    built-in defaults  <  recipe file (YAML)  <  command-line options / ``--set key.path=value``

A recipe has the sections ``model``, ``data``, ``premin``, ``train``, ``prune``, ``finetune`` and
``export``.  Unknown keys are errors that name their dotted path and the closest valid key.  The
resolved recipe is saved into every run directory (``recipe.yaml``), so a run can be repeated exactly.

The shipped recipes are package data (``convsim_shrink/recipes/*.yaml``), read through
:mod:`importlib.resources`, so they are found the same way from a source tree, a wheel or an sdist.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, unknown
from .export.registry import format_names

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def shipped_recipes() -> Traversable:
    """The folder of shipped recipes inside the installed package."""
    return resources.files("convsim_shrink") / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "resnet18",
        description="zoo name, torchvision:NAME, timm:NAME, package.module:function, or a checkpoint (.safetensors or run directory)",
    )
    weights: str | None = Field(
        None, description="DEFAULT or a torchvision weights name (downloaded), or a state-dict file (safetensors, or torch read with weights_only)",
    )
    width: float = Field(1.0, gt=0, le=16, description="multiplies every layer's channels (zoo models)")
    small_input: bool = Field(True, description="3x3 stride-1 stem, no max-pool: for 28-64 px images (zoo models)")


class DataConfig(_Section):
    name: str = "fashion-mnist"
    dir: str | None = Field(None, description="folder holding the data set (else the usual places)")
    download: bool = Field(False, description="allow downloading with torchvision when not found")
    subset: int | None = Field(None, ge=10, description="class-balanced subset of the training set")
    val_split: int = Field(0, ge=0, description="images held out of training for validation")
    test_subset: int | None = Field(None, ge=10, description="evaluate on a class-balanced test slice")
    augment: bool = True
    workers: int | None = Field(None, ge=0, description="loader workers (image folders); None = auto")
    image_size: int | None = Field(
        None, ge=16, description="side of the training crop of image folders (None = 224; evaluation resizes to size/0.875 and crops)"
    )


class PreminConfig(_Section):
    steps: int = Field(100, ge=0, description="CS pre-minimisation steps (0 = off)")
    mode: Literal["norm-preserving", "paper"] = Field(
        "norm-preserving",
        description="norm-preserving: normalized CS, filter norms restored; paper: raw CS, adjacent pairs, Adam 0.002, norms not restored",
    )
    lr: float | None = Field(None, gt=0, description="Adam learning rate (None = the mode's: 0.01, paper 0.002)")
    channels: Literal["same", "cross"] = "same"
    pairs: Literal["all", "adjacent"] | None = Field(None, description="filter pairs (None = the mode's: all, paper adjacent)")
    patience: int = Field(50, ge=1, description="stop after this many steps without 0.1% improvement")


class OptimConfig(_Section):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1, description="global batch: split evenly over the processes of a torchrun start")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="fractions of the run")
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    cs_beta: float = Field(0.0, ge=0, description="weight of the CS regulariser (0 = off)")
    cs_normalized: bool = Field(True, description="regularise the scale-free (normalized) CS")
    cs_every: int = Field(4, ge=1, description="apply the CS regulariser (scaled by this) every N steps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = Field(None, description="None = on where it is faster")
    compile: bool = False
    grad_clip: float | None = Field(None, gt=0)
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes under torchrun (CUDA only)")


class TrainConfig(OptimConfig):
    sparsity: float = Field(
        0.0, ge=0,
        description="pruning-aware (group sparse) training: coefficient of torch-pruning's group-norm regulariser, "
        "an extra weight decay on every prunable channel group, 1x on the group of largest norm to 16x on the "
        "smallest of its layer, applied every step, so its total effect grows with the number of steps "
        "(0 = off; Fang et al., DepGraph, CVPR 2023)",
    )


class FinetuneConfig(OptimConfig):
    epochs: int = Field(3, ge=0)
    batch_size: int | None = Field(None, ge=1, description="global batch of fine-tuning (None = train.batch_size)")
    lr: float = Field(0.02, gt=0)
    # 0.5: better validation accuracy in benchmarks/compare.py (docs/BENCHMARKS.md, issue 6)
    distill: float = Field(0.5, ge=0, le=1, description="weight of distillation from the dense model (0 = off)")
    temperature: float = Field(4.0, gt=0)
    distill_every: int = Field(
        1, ge=1, description="run the teacher on every N-th step only, its term scaled by N (the same objective on average at 1/N of the teacher's cost)"
    )


class PruneConfig(_Section):
    target_params: float | None = Field(0.5, gt=0, lt=1, description="keep at most this fraction of parameters")
    target_macs: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of MACs")
    target_latency: float | None = Field(
        None, gt=0, lt=1,
        description="measured latency at most this fraction of the dense model's (combines with a params/MACs target)",
    )
    latency_batch: int | None = Field(None, ge=1, description="batch size the latency is measured at (None = the fine-tuning batch)")
    latency_tolerance: float = Field(0.05, gt=0, lt=0.5, description="absolute tolerance below the latency target (timings are noisy)")
    # defaults chosen by validation accuracy in benchmarks/compare.py (docs/BENCHMARKS.md, issue 6)
    criterion: str = "convsim-taylor"
    criterion_options: dict[str, float | bool] = Field(
        default_factory=dict, description="options of the criterion, e.g. {strength: 0.5} (see `convsim-shrink list criteria`)"
    )
    global_pruning: bool = Field(True, description="rank channels across layers (layer-adaptive) instead of one ratio per layer")
    cost_exponent: float = Field(
        0.0, ge=0, le=2,
        description="global pruning: divide each channel's score by the MACs it costs to this power (importance per "
                    "unit of compute; 0 = off)",
    )
    round_to: int | None = Field(None, ge=1)
    iterative_steps: int = Field(1, ge=1, description="prune in this many steps, fine-tuning between them")
    steps_epochs: int = Field(0, ge=0, description="fine-tuning epochs between iterative steps")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="never remove more than this fraction of a layer")
    tolerance: float = Field(0.01, gt=0, lt=0.5, description="absolute tolerance below the params/MACs target, as a ratio (0.01: a 0.5 target lands in 0.49-0.50)")
    calibration_batches: int = Field(4, ge=1, description="batches for data-driven criteria (taylor)")
    graph_seconds: float = Field(
        120.0, gt=0,
        description="longest one torch-pruning call may take (building the dependency graph, one channel group, one "
                    "pruning), the less of wall and CPU time: a group past it is left unpruned, a graph past it ends "
                    "the run with the module it was at",
    )
    graph_memory_gb: float = Field(4.0, gt=0, description="most one torch-pruning call may grow the process's memory (GiB); as graph_seconds")
    bn_recalibration: int = Field(50, ge=0, description="training batches to re-estimate BN statistics after pruning (0 = off)")
    compensate: bool = Field(
        True,
        description="hand every removed channel's contribution to the kept channels of each layer that reads it (least "
                    "squares over calibration inputs), instead of dropping it",
    )
    compensation_batches: int = Field(
        16, ge=1, description="training batches whose layer inputs the compensation (and the residual criterion) is fitted on",
    )
    compensation_rows: int | None = Field(
        4096, ge=1, description="rows (images x positions) of each layer's input sampled from each statistics batch "
                                "(null: every row); the float64 products cost rows x channels^2",
    )
    compensation_ridge: float = Field(
        1e-3, ge=0, le=1, description="ridge of the compensation's least squares, relative to the kept channels' mean variance",
    )
    compensation_refit: int | None = Field(
        None, ge=0,
        description="training batches on which every conv and linear layer of the compensated model is then refitted, "
                    "in the order the model runs them, to compute from the pruned model's own inputs what the dense "
                    "layer computes (He et al. 2017's reconstruction); 0 = off; null (default) = 4 when the run "
                    "fine-tunes for 0 epochs (the post-training path), else off",
    )
    compensation_data: Literal["train", "kernels"] = Field(
        "train",
        description="what the compensation is fitted on: 'train' measures the layers' inputs on training batches; "
                    "'kernels' predicts them from the weights alone (data-free: kernels and batch-norm statistics)",
    )
    compensation_autocorrelation: float = Field(
        0.5, ge=0, lt=1, description="with compensation_data=kernels: the spatial autocorrelation assumed of every layer's input",
    )
    step_accuracy: bool = Field(
        True, description="measure top-1 after each step of pruning (dropped, compensated, BN re-estimated) for the report",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0,
        description="instead of a fixed target: the smallest model (by search_kind) whose validation top-1 after "
                    "fine-tuning is within this many points of the dense model's, found by bisection on the size "
                    "(--max-drop; data.val_split, or images held out of training when it is 0)",
    )
    search_kind: Literal["params", "macs", "latency"] = Field("params", description="what max_accuracy_drop's search sizes by")
    search_epochs: int = Field(
        1, ge=0, description="fine-tuning epochs of each candidate max_accuracy_drop's search tries (the winner gets finetune.epochs)",
    )
    search_resolution: float = Field(0.05, gt=0, lt=0.5, description="max_accuracy_drop's search stops when the size is known to this (ratio)")

    @model_validator(mode="before")
    @classmethod
    def _macs_replaces_default_params(cls, data: Any) -> Any:
        # a MACs or latency target given without a params target replaces the default params target
        if isinstance(data, dict) and "target_params" not in data:
            if data.get("target_macs") is not None or data.get("target_latency") is not None:
                data = {**data, "target_params": None}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if self.target_params is not None and self.target_macs is not None:
            raise ValueError("set only one of target_params and target_macs")
        if self.target_params is None and self.target_macs is None and self.target_latency is None:
            raise ValueError("set a pruning target: target_params, target_macs or target_latency")
        if self.compensation_refit and not self.compensate:
            raise ValueError("compensation_refit refits the compensated model: it needs compensate=true")
        if self.compensation_refit and self.compensation_data != "train":
            raise ValueError("compensation_refit measures both models on training batches: it needs compensation_data=train")
        if self.compensation_refit and self.iterative_steps > 1:
            raise ValueError("compensation_refit refits one-step pruning: set iterative_steps=1 or compensation_refit=0")
        if self.cost_exponent and not self.global_pruning:
            raise ValueError("cost_exponent weighs channels of different layers against each other; it needs "
                             "global_pruning=true (per-layer pruning removes one ratio of every layer)")
        return self


#: the registered export formats (:mod:`convsim_shrink.export.registry`)
ExportFormat = Literal[format_names()]


class ExportConfig(_Section):
    formats: list[ExportFormat] = Field(default_factory=lambda: ["convsim", "onnx"])
    opset: int = Field(17, ge=11)
    int8_calibration: int = Field(
        300, ge=1, description="training images that calibrate the int8 ONNX model's activation ranges (onnx-int8)"
    )

    @model_validator(mode="after")
    def _int8_opset(self) -> "ExportConfig":
        if "onnx-int8" in self.formats and self.opset < 13:
            raise ValueError(f"onnx-int8 needs export.opset 13 or newer (per-channel quantization), got {self.opset}")
        return self


class RunConfig(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    out: str | None = None
    quiet: bool = False
    dist_timeout: float = Field(1800, gt=0, description="seconds a process waits for the others under torchrun before the run stops with an error")
    recipe_source: str | None = Field(None, description="the recipe file the run was resolved from (set by the tool; None = built-in defaults)")


class Recipe(_Section):
    description: str = ""
    expected_minutes: dict[str, float] = Field(
        default_factory=dict,
        description="what a run of this recipe as written took, in minutes, by machine kind ('cpu-fp32', 'cpu-bf16', "
                    "'cuda'): the run's first line quotes the one for its device (measured, docs/BENCHMARKS.md)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    premin: PreminConfig = Field(default_factory=PreminConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("description", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The recipe as YAML (a run's recipe.yaml); multi-line text keeps its lines (block style)."""
        return yaml.dump(self.to_dict(), Dumper=_BlockTextDumper, sort_keys=False, allow_unicode=True)


class _BlockTextDumper(yaml.SafeDumper):
    """safe_dump, but strings with line breaks are written as ``|`` blocks, as a person writes a recipe."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    if any(c in text for c in "\x85\u2028\u2029"):  # line breaks YAML reads differently: escaped, quoted
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_BlockTextDumper.add_representer(str, _represent_text)


# --------------------------------------------------------------------------------------------- errors


def _known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_known_paths(ann, path + "."))
    return paths


def _format_validation_error(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(path, _known_paths(Recipe), n=1, cutoff=0.6)
        did = f"; did you mean '{hint[0]}'?" if hint else ""
        return ConfigError(f"{source}: unknown key '{path}'{did} (see `convsim-shrink list keys`)")
    value = first.get("input")
    return ConfigError(f"{source}: {path} = {value!r} is invalid: {first['msg']}")


# ------------------------------------------------------------------------------------------- loading


def _shipped(name: str) -> Traversable | None:
    if not name or "/" in name or "\\" in name:
        return None
    entry = shipped_recipes() / f"{name}.yaml"
    return entry if entry.is_file() else None


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``convsim-shrink list recipes``)."""
    folder = shipped_recipes()
    if not folder.is_dir():
        return []
    return sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml") and e.is_file())


def recipe_path(name_or_path: str | Path) -> Path | Traversable:
    """A recipe file: an existing path, or the name of a shipped recipe (package data).

    Raises :class:`ConfigError` for a path that does not exist and :class:`UnknownNameError` (listing the
    shipped names) for an unknown name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = _shipped(str(name_or_path))
    if shipped is not None:
        return shipped
    if path.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        raise ConfigError(f"recipe file '{name_or_path}' does not exist; give a path to a YAML file or a shipped recipe name")
    raise unknown("recipe", str(name_or_path), list_recipes())


def recipe_source(name_or_path: str | Path) -> str:
    """How a run names the recipe file it used: a user's file by its absolute path, a shipped recipe as
    ``NAME (shipped: PATH)``.  Raises as :func:`recipe_path`."""
    found = recipe_path(name_or_path)
    if isinstance(found, Path) and Path(name_or_path).is_file():
        return str(found.resolve())
    return f"{name_or_path} (shipped: {found})"


def read_recipe_file(name_or_path: str | Path) -> dict[str, Any]:
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model, data, train, ...)")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.05"`` -> (["train", "lr"], 0.05); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like key.path=value, e.g. --set train.lr=0.05")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{item}' has no key; use key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def resolve(
    recipe: str | Path | dict | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    base: dict | None = None,
) -> Recipe:
    """Build the resolved :class:`Recipe`: defaults < ``base`` < recipe < ``overrides`` < ``sets``.

    ``overrides`` maps dotted keys to values; ``None`` values are dropped, so an option left unset on the
    command line never overrides the recipe.  ``sets`` are ``key.path=value`` strings.
    """
    data: dict[str, Any] = dict(base or {})
    source = "recipe"
    if isinstance(recipe, dict):
        data = _deep_merge(data, recipe)
    elif recipe is not None:
        source = str(recipe_path(recipe))
        data = _deep_merge(data, read_recipe_file(recipe))
        data = _deep_merge(data, {"run": {"recipe_source": recipe_source(recipe)}})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    # targets given on the command line replace the recipe's targets (those given together combine)
    targets = ("target_params", "target_macs", "target_latency")
    if any(f"prune.{t}" in overrides for t in targets):
        data = _deep_merge(data, {"prune": {t: None for t in targets if f"prune.{t}" not in overrides}})
    for key, value in overrides.items():
        data = _deep_merge(data, _nest(key.split("."), value))
    for item in sets or []:
        path, value = parse_set(item)
        data = _deep_merge(data, _nest(path, value))
        source = f"{source} / --set"
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _format_validation_error(err, source) from None


def default_recipe_for(model_name: str) -> str | None:
    """The shipped recipe named after a model (``convsim_shrink/recipes/<model>.yaml``), if any."""
    return model_name if _shipped(model_name) is not None else None


def known_keys() -> list[str]:
    return _known_paths(Recipe)
