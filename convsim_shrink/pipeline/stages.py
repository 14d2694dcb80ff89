"""The pipeline's stages, each a function: what it needs goes in, what it made comes out.

    build_stage -> premin_stage -> train_stage -> prune_stage -> finetune_stage -> export_stage

A stage neither reads nor writes the run directory's state, prints nothing but progress bars (``quiet``
turns those off) and keeps no hidden state between calls, so any stage runs alone (tests, the
comparison benchmark) exactly as it runs inside a pipeline.  The runner (:mod:`.runner`) owns the
order, the run directory, resuming and logging; the benchmark (``benchmarks/compare.py``) calls these
same functions with recipes, so its rows are what the command line gives.

Reported accuracies are top-1 percent on ``data.test``, measured in fp32 as users will run the
exported model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cs.premin import PreminResult, preminimize
from ..cs.similarity import layer_similarities, model_conv_similarity
from ..data import DataBundle, DataInfo, build_data
from ..errors import ConfigError
from ..export.registry import ExportJob, get_format
from ..models import SPEC_ATTR, create_model
from ..prune.compensation import (
    CompensationReport,
    Compensator,
    InputStatistics,
    collect_input_statistics,
    predict_input_statistics,
    refit_to_dense,
)
from ..prune.pruning import Size, channel_counts, group_sparsity_regularizer, measure
from ..prune.ranking import Criterion, get_criterion
from ..prune.safety import IgnorePlan, PruningError, plan_ignored_layers
from ..prune.search import PruneResult, iterative_prune
from ..recipe import (
    ExportConfig,
    FinetuneConfig,
    ModelConfig,
    PreminConfig,
    PruneConfig,
    Recipe,
    TrainConfig,
)
from ..train import (
    Precision,
    accumulate_gradients,
    distillation,
    evaluate,
    fit,
    recalibrate_bn,
    resolve_precision,
    seed_everything,
)

# ------------------------------------------------------------------------------------------ helpers


def prepare_data(recipe: Recipe) -> DataBundle:
    """The recipe's data: training loader (global batch ``train.batch_size``, shuffled by ``run.seed``),
    optional validation split, test loader; under ``torchrun`` this process's shard of each."""
    from ..train.distributed import rank, world_size

    return build_data(recipe.data, batch_size=recipe.train.batch_size, seed=recipe.run.seed, rank=rank(), world_size=world_size())


def example_inputs_for(info: DataInfo) -> torch.Tensor:
    """One random input of the data set's shape ``(1, C, H, W)``, for measuring, tracing and exporting."""
    return torch.randn(1, info.in_channels, info.image_size, info.image_size)


def is_registered(model: nn.Module) -> bool:
    """Whether ``model`` was built by the model registry (and so saves in the pickle-free format)."""
    return getattr(model, SPEC_ATTR, None) is not None


def conv_similarity_summary(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Normalized CS summed over conv layers, and per layer."""
    with torch.no_grad():
        total = float(model_conv_similarity(model, normalized=True))
        layers = {k: float(v) for k, v in layer_similarities(model, normalized=True).items()}
    return total, layers


def eval_precision(device: torch.device, cfg) -> Precision:
    return resolve_precision(device, "fp32", cfg.channels_last)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------- stages


@dataclass
class BuildOutcome:
    model: nn.Module
    size: Size
    channels: dict[str, int]
    cs: float
    cs_layers: dict[str, float]


def build_stage(
    cfg: ModelConfig,
    info: DataInfo,
    *,
    seed: int,
    example_inputs: torch.Tensor,
    device: torch.device | str = "cpu",
    model: nn.Module | None = None,
) -> BuildOutcome:
    """Seed every generator with ``seed``, then build ``cfg.name`` for the data set ``info`` (or take the
    given ``model``), put it on ``device`` and measure it (params, MACs per image of ``example_inputs``'s
    shape, channels and CS per layer).  Unknown names raise :class:`~convsim_shrink.errors.UnknownNameError`."""
    seed_everything(seed)
    if model is None:
        model = create_model(
            cfg.name, num_classes=info.num_classes, in_channels=info.in_channels, width=cfg.width, small_input=cfg.small_input,
        )
    model.to(device)
    size = measure(model, example_inputs.to(device))
    cs, cs_layers = conv_similarity_summary(model)
    return BuildOutcome(model, size, channel_counts(model), cs, cs_layers)


@dataclass
class PreminOutcome:
    result: PreminResult
    cs: float
    cs_layers: dict[str, float]


def premin_stage(model: nn.Module, cfg: PreminConfig, *, quiet: bool = True) -> PreminOutcome:
    """CS pre-minimisation of ``model`` in place with every setting of ``cfg`` (``steps=0``: nothing)."""
    result = preminimize(model, **cfg.model_dump(), quiet=quiet)
    cs, cs_layers = conv_similarity_summary(model)
    return PreminOutcome(result, cs, cs_layers)


@dataclass
class TrainOutcome:
    model: nn.Module
    history: list[dict[str, float]]
    accuracy: float
    cs: float
    cs_layers: dict[str, float]


def train_stage(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
) -> TrainOutcome:
    """Train ``model`` in place on ``data.train`` for ``cfg.epochs`` epochs (validation accuracy per epoch
    on ``data.val`` if there is one), then measure its test accuracy and CS.  ``checkpoint``: the
    per-epoch training checkpoint; with ``resume`` training continues after its last epoch.

    ``cfg.sparsity > 0``: pruning-aware training
    (:func:`~convsim_shrink.prune.pruning.group_sparsity_regularizer`), leaving alone the layers the prune
    stage will leave alone; a model of which nothing can be pruned raises :class:`PruningError` before
    the first step."""
    device = device or _device_of(model)
    after_backward = None
    if cfg.sparsity > 0 and cfg.epochs > 0:
        model.to(device)
        with torch.random.fork_rng(devices=[]):  # the set-up leaves training's random numbers as they were
            x = example_inputs_for(data.info).to(device)
            plan = plan_ignored_layers(model, x)
            if plan.refused:
                raise PruningError(plan.summary())
            after_backward = group_sparsity_regularizer(model, x, cfg.sparsity, ignored_layers=plan.layers)
    result = fit(
        model, data.train, cfg, eval_loader=data.val, device=device, checkpoint=checkpoint, resume=resume,
        stage="train", quiet=quiet, after_backward=after_backward,
    )
    accuracy = evaluate(model, data.test, eval_precision(device, cfg))["acc"]
    cs, cs_layers = conv_similarity_summary(model)
    return TrainOutcome(model, result.history, accuracy, cs, cs_layers)


@dataclass
class PruneOutcome:
    model: nn.Module
    result: PruneResult
    accuracy: float  # after BN re-calibration, before fine-tuning
    bn_batches: int
    hint: str | None = None  # the criterion does not suit the pruning mode
    plan: IgnorePlan | None = None  # the layers left unpruned, each with its reason
    #: top-1 after each step (prune.step_accuracy) on the validation split if there is one, else the test set
    #: (``steps_split``): "dense", "dropped" (channels removed, nothing else), "compensated" (with compensation,
    #: before BN re-estimation), "bn" (after it)
    steps: dict[str, float] = field(default_factory=dict)
    compensation: CompensationReport | None = None
    steps_split: str = "test"


@dataclass
class PruneReuse:
    """What :func:`prune_stage` measures on the dense model before it searches for a size, kept for the
    next call on the same dense model with the same settings but another target (a sweep, a size search):
    the calibrated copy (Taylor gradients, BN statistics of the calibration batches), the layers' input
    statistics (compensation, the residual criterion), the plan of layers left alone, and the dense
    model's latency in seconds per batch at the latency batch (median of 3, on rank 0's numbers).

    Reuse gives the same pruned model as a fresh call: calibration reads the training data in one fixed
    order and the search prunes copies of the calibrated model, leaving it as it was.  It applies to
    one-step pruning only (``prune.iterative_steps`` 1); a call with other settings or another dense model
    measures again and replaces what is kept."""

    key: tuple | None = None
    source: nn.Module | None = None
    statistics: InputStatistics | None = None
    plan: IgnorePlan | None = None
    base_latency: float | None = None
    #: how often the dense model was calibrated / its latency measured (for tests and reports)
    calibrations: int = 0
    latency_measurements: int = 0


def _median_seconds(values: list) -> float:
    """Median in seconds of latency measurements (floats or :class:`~convsim_shrink.measure.latency.Latency`)."""
    import statistics

    return statistics.median(float(getattr(v, "seconds", v)) for v in values)


def _reuse_key(dense: nn.Module, cfg: PruneConfig) -> tuple:
    settings = cfg.model_dump(mode="json", exclude={"target_params", "target_macs", "target_latency", "latency_tolerance",
                                                    "tolerance", "max_accuracy_drop", "search_kind", "search_epochs", "search_resolution"})
    return id(dense), repr(sorted(settings.items()))


def criterion_hint(criterion: Criterion, global_pruning: bool) -> str | None:
    """One line when global pruning ranks a criterion whose scores are not comparable across layers."""
    if global_pruning and not criterion.global_ranking:
        return (f"criterion '{criterion.name}' scores are not comparable across layers but prune.global_pruning is on; "
                "--set prune.global_pruning=false gives every layer the same ratio")
    return None


#: batches the refit measures when ``prune.compensation_refit`` is left to the run (null) and it fine-tunes 0 epochs
AUTO_REFIT_BATCHES = 4


def refit_batches(cfg: PruneConfig, finetune: FinetuneConfig) -> int:
    """How many training batches the prune stage's refit measures (0: no refit): ``cfg.compensation_refit``
    when set; when null, :data:`AUTO_REFIT_BATCHES` for a run that fine-tunes 0 epochs (the refit measured
    ahead of compensation alone with no fine-tuning, docs/BENCHMARKS.md) and compensates in one step on
    training data, else 0."""
    if cfg.compensation_refit is not None:
        return cfg.compensation_refit
    usable = cfg.compensate and cfg.compensation_data == "train" and cfg.iterative_steps == 1
    return AUTO_REFIT_BATCHES if usable and finetune.epochs == 0 else 0


def prune_stage(
    dense: nn.Module,
    data: DataBundle,
    cfg: PruneConfig,
    *,
    example_inputs: torch.Tensor,
    finetune: FinetuneConfig | None = None,
    device: torch.device | None = None,
    quiet: bool = True,
    reuse: PruneReuse | None = None,
    say: Callable[[str], None] | None = None,
) -> PruneOutcome:
    """A pruned copy of ``dense`` at ``cfg``'s measured target (``dense`` is left as it was).

    First the layers torch-pruning cannot prune safely are planned
    (:func:`~convsim_shrink.prune.safety.plan_ignored_layers`: the output layers, channel shuffles,
    split/concatenate blocks, pixel shuffles, and whatever fails a trial pruning); every pruning step
    leaves them alone and is verified (:func:`~convsim_shrink.prune.safety.prune_safely`), so
    torch-pruning's own errors become one-line :class:`~convsim_shrink.prune.safety.PruningError`.
    Criteria that need gradients score a copy after ``cfg.calibration_batches`` batches of task-loss
    gradients; with ``cfg.iterative_steps > 1`` the model is fine-tuned ``cfg.steps_epochs`` epochs
    (``finetune``'s settings) between steps.  With ``cfg.compensate`` (the default) the inputs of every
    conv and linear layer are measured on ``cfg.compensation_batches`` training batches before each step,
    the target search runs as without compensation, and the winner's removed channels are then handed to
    the kept channels of every layer that reads them (:mod:`~convsim_shrink.prune.compensation`); criteria that
    need statistics (``residual``) score on the same measurements; with ``cfg.compensation_refit`` the layers are then
    refitted to the dense ones on that many batches (:func:`~convsim_shrink.prune.compensation.refit_to_dense`).
    Batch-norm statistics are then re-estimated on
    ``cfg.bn_recalibration`` training batches and the test accuracy measured (with ``cfg.step_accuracy``
    also after each step: ``outcome.steps``).  Calibration, statistics and re-estimation
    read the training data in one fixed order (epoch 0's), whatever epoch the loader was left at.  Raises
    :class:`~convsim_shrink.errors.TargetUnreachableError` when the target cannot be met.

    ``reuse`` (:class:`PruneReuse`, one-step pruning): the dense model's calibration, input statistics,
    plan and latency are taken from it when it holds them for ``dense`` and these settings, else measured
    and kept in it, so calls for several targets measure them once.  ``say(text)`` is called as each part
    starts (``"pruning: searching for 0.5 of the params"``), so a log shows what the stage is doing.
    """
    ft = finetune or FinetuneConfig()
    say = say or (lambda text: None)
    device = device or _device_of(dense)
    criterion = get_criterion(cfg.criterion)
    options = dict(cfg.criterion_options)
    criterion.create(**options)  # a bad option fails before any work
    needs_statistics = cfg.compensate or criterion.needs_statistics
    statistics: dict[str, InputStatistics] = {}
    ft_steps = ft.model_copy(update={"epochs": cfg.steps_epochs})

    def between(model: nn.Module, step: int) -> None:
        if cfg.steps_epochs:
            fit(model, _finetune_loader(data, ft), ft_steps, device=device, stage=f"prune-step{step}", quiet=quiet)

    def before_scoring(model: nn.Module) -> None:
        if criterion.needs_gradients:
            say(f"pruning: task-loss gradients for '{cfg.criterion}' on {cfg.calibration_batches} training batches")
            with _fixed_order(data.train) as train:
                accumulate_gradients(model, train, cfg.calibration_batches)
        if needs_statistics:  # the layers' inputs before this step's pruning, for compensation and the residual criterion
            say("pruning: the layers' input statistics for compensation"
                + (" (from the weights)" if cfg.compensation_data == "kernels" else f" on {cfg.compensation_batches} training batches"))
            if cfg.compensation_data == "kernels":
                statistics["now"] = predict_input_statistics(
                    model, example_inputs, autocorrelation=cfg.compensation_autocorrelation)
            else:
                with _fixed_order(data.train) as train:
                    statistics["now"] = collect_input_statistics(model, train, cfg.compensation_batches,
                                                                  max_rows=cfg.compensation_rows)

    def make_importance():
        importance = criterion.create(**options)
        if criterion.needs_statistics:
            importance.statistics = statistics["now"]
        return importance

    def make_compensator(model: nn.Module) -> Compensator:
        return Compensator(statistics["now"], ridge=cfg.compensation_ridge)

    latency_fn = None
    if cfg.target_latency is not None:
        # measured on the run's device, in fp32 as the exported model runs, at the latency batch
        from ..measure.latency import latency_meter
        from ..train.distributed import from_rank0

        # under torchrun rank 0 measures and every rank decides on its numbers
        latency_fn = from_rank0(latency_meter(tuple(example_inputs.shape[1:]), latency_batch_size(cfg, ft, data), device=device))
    scoring = before_scoring if (criterion.needs_gradients or needs_statistics) else None
    base_latency = None
    key = _reuse_key(dense, cfg) if reuse is not None and cfg.iterative_steps == 1 else None
    if key is not None and reuse.key == key:  # measured on this dense model with these settings before
        source, plan = reuse.source, reuse.plan
        if reuse.statistics is not None:
            statistics["now"] = reuse.statistics
        scoring = None
    else:
        # calibration writes gradients and BN statistics: only then work on a copy of the dense model
        source = copy.deepcopy(dense) if criterion.needs_gradients else dense
        say("pruning: finding the layers to leave alone (torch-pruning's dependency graph, trial prunings)")
        plan = plan_ignored_layers(source, example_inputs.to(device))
        if plan.refused:
            raise PruningError(plan.summary())
        if key is not None:  # one step: score once here (as iterative_prune would), and keep it all
            if scoring is not None:
                scoring(source)
                reuse.calibrations += 1
            scoring = None
            reuse.key, reuse.source, reuse.plan, reuse.base_latency = key, source, plan, None
            reuse.statistics = statistics.get("now")
    if key is not None and latency_fn is not None:  # the dense model's latency: measured once, the base of every target
        if reuse.base_latency is None:
            reuse.base_latency = _median_seconds([latency_fn(dense) for _ in range(3)])
            reuse.latency_measurements += 3
        base_latency = reuse.base_latency
    wanted = ", ".join(f"{t:g} of the {kind}" for kind, t in (("params", cfg.target_params), ("MACs", cfg.target_macs),
                                                               ("latency", cfg.target_latency)) if t is not None)
    say(f"pruning: searching for {wanted}" + (f" in {cfg.iterative_steps} steps" if cfg.iterative_steps > 1 else "")
        + (", then compensating the removed channels" if cfg.compensate else ""))
    result = iterative_prune(
        source, example_inputs, make_importance, steps=cfg.iterative_steps,
        between=between, before_scoring=scoring, base_latency=base_latency,
        make_compensator=make_compensator if cfg.compensate else None,
        target_params=cfg.target_params, target_macs=cfg.target_macs, target_latency=cfg.target_latency,
        latency_fn=latency_fn, latency_tolerance=cfg.latency_tolerance, round_to=cfg.round_to,
        global_pruning=cfg.global_pruning, max_layer_ratio=cfg.max_layer_ratio, tolerance=cfg.tolerance, warn=False,
        plan=plan, cost_exponent=cfg.cost_exponent,
    )
    model = result.model.to(device)
    model.zero_grad(set_to_none=True)
    steps: dict[str, float] = {}
    step_data = data.val if data.val is not None else data.test
    if cfg.step_accuracy:
        steps["dense"] = evaluate(dense, step_data, eval_precision(device, ft))["acc"]
        plain = result.uncompensated if result.uncompensated is not None else model
        steps["dropped"] = evaluate(plain.to(device), step_data, eval_precision(device, ft))["acc"]
        if result.uncompensated is not None:
            steps["compensated"] = evaluate(model, step_data, eval_precision(device, ft))["acc"]
    refit = refit_batches(cfg, ft)
    if refit and result.compensation is not None:
        say(f"pruning: refitting the layers to the dense model's on {refit} training batches")
        with _fixed_order(data.train) as train:
            refit_to_dense(model, dense, result.compensation, train, refit,
                           ridge=cfg.compensation_ridge, max_rows=cfg.compensation_rows)
        if cfg.step_accuracy:
            steps["refitted"] = evaluate(model, step_data, eval_precision(device, ft))["acc"]
    result.uncompensated = None  # not kept past the stage: a second model's memory
    bn_batches = 0
    if cfg.bn_recalibration:
        refitted = result.compensation.refitted_norms if result.compensation is not None else []
        say(f"pruning: re-estimating batch-norm statistics on {cfg.bn_recalibration} training batches"
            + (f" (the {len(refitted)} after refitted layers keep the dense statistics)" if refitted else ""))
        with _fixed_order(data.train) as train:
            bn_batches = recalibrate_bn(model, train, cfg.bn_recalibration, resolve_precision(device, ft.precision, ft.channels_last),
                                        keep=[model.get_submodule(name) for name in refitted])
    accuracy = evaluate(model, data.test, eval_precision(device, ft))["acc"]
    if cfg.step_accuracy:
        if step_data is data.test:
            steps["bn"] = accuracy
        elif bn_batches == 0 and "refitted" in steps:  # nothing re-estimated: the model measured one step ago
            steps["bn"] = steps["refitted"]
        else:
            steps["bn"] = evaluate(model, step_data, eval_precision(device, ft))["acc"]
    return PruneOutcome(model, result, accuracy, bn_batches, criterion_hint(criterion, cfg.global_pruning), result.plan,
                        steps, result.compensation, "val" if step_data is data.val else "test")


@dataclass
class FinetuneOutcome:
    model: nn.Module
    history: list[dict[str, float]]
    accuracy: float
    channels: dict[str, int]
    cs: float
    cs_layers: dict[str, float]


def latency_batch_size(cfg: PruneConfig, ft: FinetuneConfig, data: DataBundle) -> int:
    """The batch a latency is measured at: ``prune.latency_batch``, else the fine-tuning batch (the global
    ``finetune.batch_size``, else the training loader's global batch; 64 for a loader that has none), capped
    at the number of training images."""
    if cfg.latency_batch:
        return cfg.latency_batch
    loader = data.train
    samples = getattr(loader, "num_samples", None)
    if ft.batch_size:
        batch = ft.batch_size
    else:
        batch = getattr(loader, "batch_size", None)
        batch = batch * getattr(loader, "world_size", 1) if batch else 64
    # no larger than the training set: a batch the data never fills is not one the model runs at
    return max(1, min(batch, samples)) if isinstance(samples, int) and samples > 0 else batch


@contextlib.contextmanager
def _fixed_order(loader, epoch: int = 0):
    """``loader`` iterating in the order (and with the augmentations) of ``epoch``, its own epoch restored
    after.  Our loaders' batches depend on the epoch they were last set to, which training leaves at its
    last epoch and a resumed run that skipped training leaves at 0: calibration, BN re-estimation and int8
    calibration read the training data in one fixed order, so pruning depends only on the dense model, the
    seed and the settings (the same model whether the run was resumed, and in every row of a benchmark).
    A loader without ``set_epoch`` (a plain ``DataLoader``) is used as it is."""
    previous = getattr(loader, "epoch", None)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    try:
        yield loader
    finally:
        if previous is not None and hasattr(loader, "set_epoch"):
            loader.set_epoch(previous)


def _finetune_loader(data: DataBundle, cfg: FinetuneConfig):
    """The training images at ``finetune.batch_size`` (the data were batched at ``train.batch_size``,
    which None keeps); a loader of the caller's own (a plain ``DataLoader``) keeps its batch size."""
    if cfg.batch_size is None or not hasattr(data.train, "rebatched"):
        return data.train
    return data.train.rebatched(cfg.batch_size)


def finetune_stage(
    model: nn.Module,
    teacher: nn.Module | None,
    data: DataBundle,
    cfg: FinetuneConfig,
    *,
    device: torch.device | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
) -> FinetuneOutcome:
    """Fine-tune the pruned ``model`` in place for ``cfg.epochs`` epochs, distilling from a copy of
    ``teacher`` (the dense model) with weight ``cfg.distill`` (the task loss weighs ``1 - distill``), then
    measure test accuracy, channels and CS.  ``checkpoint``/``resume`` as in :func:`train_stage`."""
    device = device or _device_of(model)
    extra: tuple = ()
    task_weight = 1.0
    if cfg.distill > 0:
        if teacher is None:
            raise ConfigError("finetune.distill > 0 distils from the dense model, but none was given; pass the teacher or set finetune.distill=0")
        teacher = copy.deepcopy(teacher).to(device).eval()
        prec = resolve_precision(device, cfg.precision, cfg.channels_last)  # the engine's (fit's) precision
        extra = (distillation(teacher, cfg.distill, cfg.temperature, prec=prec, every=cfg.distill_every),)
        task_weight = 1.0 - cfg.distill
    result = fit(
        model, _finetune_loader(data, cfg), cfg, eval_loader=data.val, device=device, extra=extra, task_weight=task_weight,
        checkpoint=checkpoint, resume=resume, stage="finetune", quiet=quiet,
    )
    accuracy = evaluate(model, data.test, eval_precision(device, cfg))["acc"]
    cs, cs_layers = conv_similarity_summary(model)
    return FinetuneOutcome(model, result.history, accuracy, channel_counts(model), cs, cs_layers)


@dataclass
class ExportOutcome:
    exports: dict[str, str] = field(default_factory=dict)  # format (or "pickle") -> file
    #: what the formats measured of their files, by report field (``onnx_max_abs_diff``, ``pt2_max_abs_diff``,
    #: ``int8``: :meth:`~convsim_shrink.export.onnx_int8.Int8Export.to_dict`)
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_max_abs_diff(self) -> float | None:
        return self.checks.get("onnx_max_abs_diff")

    @property
    def pt2_max_abs_diff(self) -> float | None:
        return self.checks.get("pt2_max_abs_diff")

    @property
    def int8(self) -> dict | None:
        return self.checks.get("int8")


def export_stage(
    model: nn.Module,
    cfg: ExportConfig,
    out: Path,
    *,
    example_inputs: torch.Tensor,
    recipe: dict | None = None,
    metrics: dict | None = None,
    data: DataBundle | None = None,
) -> ExportOutcome:
    """Write ``model`` into the folder ``out`` in every format of ``cfg.formats``, in order, each by its
    module in the export registry (:mod:`convsim_shrink.export.registry`): ``convsim``
    (``model.safetensors`` with ``recipe``, ``metrics`` and the input shape in its header; a model from
    outside the registry becomes a full pickle ``model.pt``), ``onnx`` (checked against onnxruntime when
    it is installed), ``onnx-int8`` (static int8 quantization with onnxruntime, calibrated on
    ``cfg.int8_calibration`` training images of ``data``, read in epoch 0's order, both models' top-1
    measured on ``data.test``), ``pt2`` (a ``torch.export`` program, checked against the eager model) and
    ``torchscript``.  The model ends on the device it started on.

    Raises:
        ConfigError: ``onnx-int8`` without ``data``.
    """
    out = Path(out)
    device = _device_of(model)
    model = model.cpu().eval()
    outcome = ExportOutcome()
    job = ExportJob(model, out, example_inputs.cpu(), opset=cfg.opset, recipe=recipe, metrics=metrics, data=data,
                    int8_calibration=cfg.int8_calibration, written=outcome.exports)
    try:
        with _fixed_order(data.train) if data is not None else contextlib.nullcontext():
            for name in cfg.formats:
                fmt = get_format(name)
                done = fmt.implementation().write(dataclasses.replace(job, path=out / fmt.filename))
                outcome.exports[done.label] = str(done.path)
                outcome.checks.update(done.checks)
    finally:
        model.to(device)
    return outcome
