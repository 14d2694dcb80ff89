"""The pipeline: the only place that knows the stage order.

    build -> premin (CS pre-minimisation) -> train -> prune (rank + cut to a measured size)
          -> finetune -> export -> report

Every stage's output lands in the run directory, and ``state.json`` (written atomically after each
stage) records which stages are done; a resumed run skips them and reloads their outputs.  Training
stages checkpoint every epoch, so an interrupted run loses at most one epoch.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .console import console
from .data import DataBundle, build_data
from .engine import (
    accumulate_gradients,
    atomic_write_bytes,
    distillation,
    evaluate,
    fit,
    recalibrate_bn,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from .errors import CheckpointError, ConfigError
from .models import SPEC_ATTR, create_model, list_models
from .premin import preminimize
from .preflight import check_run
from .pruning import channel_counts, iterative_prune, measure
from .ranking import NEEDS_GRADIENTS, make_importance
from .recipe import Recipe
from .similarity import layer_similarities, model_conv_similarity

STAGES = ("build", "premin", "train", "prune", "finetune", "export")


@dataclass
class ShrinkResult:
    model: nn.Module
    dense_model: nn.Module | None
    report: dict[str, Any]
    run_dir: Path | None


def default_run_dir(model_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_name}-{stamp}"


def _cs(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model_conv_similarity(model, normalized=True))


def _cs_layers(model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        return {k: float(v) for k, v in layer_similarities(model, normalized=True).items()}


class Pipeline:
    """One run of the pipeline for a resolved :class:`Recipe`.

    ``model``/``data`` may be given (Python API: any ``nn.Module`` and any loaders); otherwise they
    come from the recipe.  Nothing is written before :meth:`prepare` has validated the model name and
    found the data.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        *,
        model: nn.Module | None = None,
        data: DataBundle | None = None,
        resume: bool = False,
        example_inputs: torch.Tensor | None = None,
    ):
        self.recipe = recipe
        self.quiet = recipe.run.quiet
        self.run_dir = Path(run_dir) if run_dir else (Path(recipe.run.out) if recipe.run.out else None)
        self.resume = resume
        self.given_model = model
        self.data = data
        self.example_inputs = example_inputs
        self.state: dict[str, Any] = {"completed": [], "seconds": {}, "metrics": {}}
        self.device = resolve_device(recipe.run.device)
        self.model: nn.Module | None = None
        self.dense: nn.Module | None = None

    # ------------------------------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        if not self.quiet:
            console.print(msg)

    def _path(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir else None

    def _save_state(self) -> None:
        if self.run_dir:
            atomic_write_bytes(self.run_dir / "state.json", json.dumps(self.state, indent=1).encode())

    def _done(self, stage: str) -> bool:
        return stage in self.state["completed"]

    def _finish(self, stage: str, seconds: float, **metrics) -> None:
        self.state["completed"].append(stage)
        self.state["seconds"][stage] = round(seconds, 3)
        self.state["metrics"].update(metrics)
        self._save_state()

    def _eval_precision(self):
        """Reported accuracies are measured in fp32, as users will run the exported model."""
        return resolve_precision(self.device, "fp32", self.recipe.train.channels_last)

    def _registered(self, model: nn.Module) -> bool:
        return getattr(model, SPEC_ATTR, None) is not None

    def _save_model(self, model: nn.Module, name: str) -> None:
        path = self._path(name)
        if path is not None and self._registered(model):
            ckpt.save(model.cpu(), path, recipe=self.recipe.to_dict(), metrics=self.state["metrics"])
            model.to(self.device)

    def _load_model(self, name: str) -> nn.Module:
        path = self._path(name)
        if path is None or not path.is_file():
            raise CheckpointError(f"cannot resume: {path} is missing; start a new run")
        return ckpt.load(path).to(self.device)

    # ---------------------------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """Validate everything that can fail on user input or the environment, then create the run directory."""
        r = self.recipe
        check_run(r, self.run_dir, resume=self.resume)  # device, packages, output folder: before any work
        if self.given_model is None and r.model.name not in list_models():
            from .errors import unknown

            raise unknown("model", r.model.name, list_models())
        make_importance(r.prune.criterion)  # unknown criterion fails here
        if self.data is None:
            self.data = build_data(r.data, batch_size=r.train.batch_size, seed=r.run.seed)
        if self.example_inputs is None:
            info = self.data.info
            self.example_inputs = torch.randn(1, info.in_channels, info.image_size, info.image_size)
        if self.run_dir is None:
            return
        if self.resume:
            state_file = self.run_dir / "state.json"
            if not state_file.is_file():
                raise CheckpointError(f"{self.run_dir} is not a run directory (no state.json); check the path given to --resume")
            try:
                self.state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"{state_file} is damaged; start a new run") from None
            if self.given_model is not None:
                raise ConfigError("resuming is supported for registry models only; start the Python API run again")
            if "premin" not in self.state["completed"]:
                self.state["completed"] = []  # build + premin are cheap and seeded: redo them together
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "recipe.yaml", self.recipe.to_yaml().encode())
        self._save_state()

    # ----------------------------------------------------------------------------------- stages

    def _build(self) -> None:
        r = self.recipe
        if self._done("build"):
            return
        seed_everything(r.run.seed)
        t0 = time.perf_counter()
        if self.given_model is not None:
            self.model = self.given_model
        else:
            info = self.data.info
            self.model = create_model(
                r.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                width=r.model.width, small_input=r.model.small_input,
            )
        self.model.to(self.device)
        size = measure(self.model, self.example_inputs.to(self.device))
        self.state["metrics"]["dense_size"] = {"params": size.params, "macs": size.macs}
        self.state["layers"] = {"channels_dense": channel_counts(self.model), "cs_init": _cs_layers(self.model)}
        self._finish("build", time.perf_counter() - t0, cs_init=_cs(self.model))

    def _premin(self) -> None:
        p = self.recipe.premin
        if self._done("premin"):
            return
        res = preminimize(self.model, steps=p.steps, lr=p.lr, channels=p.channels, pairs=p.pairs, patience=p.patience, quiet=self.quiet)
        if p.steps:
            self.log(f"CS pre-minimisation: {res.cs_before:.4g} -> {res.cs_after:.4g} in {res.steps} steps ({res.seconds:.1f} s)")
        self._save_model(self.model, "premin.safetensors")
        self.state["layers"]["cs_after_premin"] = _cs_layers(self.model)
        self._finish("premin", res.seconds, cs_after_premin=_cs(self.model), premin_steps=res.steps)

    def _train(self) -> None:
        r = self.recipe
        if self._done("train"):
            self.model = self._load_model("dense.safetensors")
            return
        t0 = time.perf_counter()
        result = fit(
            self.model, self.data.train, r.train, eval_loader=self.data.val, device=self.device,
            checkpoint=self._path("train.pt"), resume=self.resume, stage="train", quiet=self.quiet,
        )
        acc = evaluate(self.model, self.data.test, self._eval_precision())["acc"]
        self.log(f"dense model: {acc:.2f}% top-1 on {self.data.test.num_samples if hasattr(self.data.test, 'num_samples') else 'the'} test images")
        self.state["history_train"] = result.history
        self.state["layers"]["cs_after_train"] = _cs_layers(self.model)
        self.state["metrics"]["dense_accuracy"] = acc
        self._save_model(self.model, "dense.safetensors")
        self._finish("train", time.perf_counter() - t0, cs_after_train=_cs(self.model))

    def _calibrate(self, model: nn.Module) -> None:
        """Gradients of the task loss on a few training batches (for Taylor importance)."""
        accumulate_gradients(model, self.data.train, self.recipe.prune.calibration_batches)

    def _prune(self) -> None:
        pr = self.recipe.prune
        self.dense = self.model
        if self._done("prune"):
            self.model = self._load_model("pruned.safetensors")
            return
        t0 = time.perf_counter()
        needs_grad = pr.criterion in NEEDS_GRADIENTS
        ft_steps = self.recipe.finetune.model_copy(update={"epochs": pr.steps_epochs})

        def between(model: nn.Module, step: int) -> None:
            if pr.steps_epochs:
                fit(model, self.data.train, ft_steps, device=self.device, stage=f"prune-step{step}", quiet=self.quiet)

        # calibration writes gradients and BN statistics: only then work on a copy of the dense model
        source = copy.deepcopy(self.dense) if needs_grad else self.dense
        result = iterative_prune(
            source, self.example_inputs, lambda: make_importance(pr.criterion), steps=pr.iterative_steps,
            between=between, before_scoring=self._calibrate if needs_grad else None,
            target_params=pr.target_params, target_macs=pr.target_macs, round_to=pr.round_to,
            global_pruning=pr.global_pruning, max_layer_ratio=pr.max_layer_ratio, tolerance=pr.tolerance, warn=False,
        )
        if result.note:  # one clean line, also under --quiet, instead of Python's warning format
            console.print(f"note: {result.note}")
            self.state["metrics"]["prune_note"] = result.note
        self.model = result.model.to(self.device)
        self.model.zero_grad(set_to_none=True)
        if pr.bn_recalibration:
            prec = resolve_precision(self.device, self.recipe.finetune.precision, self.recipe.finetune.channels_last)
            recalibrate_bn(self.model, self.data.train, pr.bn_recalibration, prec)
        acc = evaluate(self.model, self.data.test, self._eval_precision())["acc"]
        self.log(
            f"pruned with '{pr.criterion}' to {result.params_ratio:.3f} of the params, {result.macs_ratio:.3f} of the MACs "
            f"({result.trials} trials): {acc:.2f}% before fine-tuning"
        )
        self.state["metrics"].update(
            pruned_accuracy=acc, shrunk_size={"params": result.pruned.params, "macs": result.pruned.macs},
            channel_ratio=result.channel_ratio,
        )
        self._save_model(self.model, "pruned.safetensors")
        self._finish("prune", time.perf_counter() - t0)

    def _finetune(self) -> None:
        f = self.recipe.finetune
        if self._done("finetune"):
            self.model = self._load_model("shrunk.safetensors")
            return
        t0 = time.perf_counter()
        extra = ()
        task_weight = 1.0
        if f.distill > 0:
            teacher = copy.deepcopy(self.dense).to(self.device).eval()
            extra = (distillation(teacher, f.distill, f.temperature),)
            task_weight = 1.0 - f.distill
        result = fit(
            self.model, self.data.train, f, eval_loader=self.data.val, device=self.device, extra=extra,
            task_weight=task_weight, checkpoint=self._path("finetune.pt"), resume=self.resume, stage="finetune",
            quiet=self.quiet,
        )
        acc = evaluate(self.model, self.data.test, self._eval_precision())["acc"]
        self.state["history_finetune"] = result.history
        self.state["metrics"]["shrunk_accuracy"] = acc
        self.state["layers"]["channels_shrunk"] = channel_counts(self.model)
        self.state["layers"]["cs_shrunk"] = _cs_layers(self.model)
        self._save_model(self.model, "shrunk.safetensors")
        self._finish("finetune", time.perf_counter() - t0, cs_shrunk=_cs(self.model))

    def _export(self) -> None:
        if self._done("export") or self.run_dir is None:
            return
        t0 = time.perf_counter()
        model = self.model.cpu().eval()
        x = self.example_inputs.cpu()
        exports: dict[str, str] = {}
        for fmt in self.recipe.export.formats:
            if fmt == "convsim":
                if self._registered(model):
                    exports["convsim"] = str(ckpt.save(model, self.run_dir / "model.safetensors", recipe=self.recipe.to_dict(), metrics=self.state["metrics"]))
                else:
                    exports["pickle"] = str(ckpt.save_full(model, self.run_dir / "model.pt"))
            elif fmt == "onnx":
                path = ckpt.export_onnx(model, self.run_dir / "model.onnx", x, opset=self.recipe.export.opset)
                exports["onnx"] = str(path)
                try:
                    diff = ckpt.onnx_max_difference(model, path, torch.randn(4, *x.shape[1:]))
                    self.state["metrics"]["onnx_max_abs_diff"] = diff
                except ImportError:
                    pass
            elif fmt == "torchscript":
                exports["torchscript"] = str(ckpt.export_torchscript(model, self.run_dir / "model.ts", x))
        self.model.to(self.device)
        self.state["exports"] = exports
        self._finish("export", time.perf_counter() - t0)

    # -------------------------------------------------------------------------------------- run

    def run(self) -> ShrinkResult:
        from .report import build_report, write_report

        self.prepare()
        if self._done("premin") and not self._done("train"):
            self.model = self._load_model("premin.safetensors")
        self.log(f"device: {resolve_precision(self.device, self.recipe.train.precision, self.recipe.train.channels_last).describe()}"
                 + (f"; run directory: {self.run_dir}" if self.run_dir else ""))
        self.log(f"recipe: {self.recipe.run.recipe_source or 'built-in defaults (no recipe file)'}")
        for stage in ("build", "premin", "train", "prune", "finetune", "export"):
            getattr(self, f"_{stage}")()
        report = build_report(self.recipe, self.state, self.data)
        if self.run_dir is not None:
            write_report(report, self.state, self.run_dir)
        return ShrinkResult(self.model, self.dense, report, self.run_dir)


def shrink(
    model: nn.Module,
    train_data,
    val_data,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    recipe: Recipe | dict | str | None = None,
    example_inputs: torch.Tensor | None = None,
    run_dir: str | Path | None = None,
    num_classes: int | None = None,
) -> ShrinkResult:
    """Shrink any ``nn.Module``: CS pre-minimisation, training, ranking, pruning and fine-tuning as the
    recipe says, on your own loaders (iterables of ``(images, labels)`` batches).

    ``val_data`` is used for the reported accuracies.  With ``recipe`` None the built-in defaults are
    used (``premin.steps``/``train.epochs`` of 0 skip those stages for an already trained model).
    Returns the shrunk model and the report (``result.report``).
    """
    from .data import DataInfo
    from .recipe import resolve

    overrides: dict[str, Any] = {}
    if target_params is not None:
        overrides["prune.target_params"] = target_params
    if target_macs is not None:
        overrides["prune.target_macs"] = target_macs
    resolved = resolve(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides=overrides)
    if example_inputs is None:
        x, _ = next(iter(val_data))
        example_inputs = x[:1]
    info = DataInfo("custom", num_classes or 0, example_inputs.shape[1], example_inputs.shape[-1], (), (), pad=0)
    bundle = DataBundle(info, train_data, None, val_data)
    pipeline = Pipeline(resolved, run_dir, model=model, data=bundle, example_inputs=example_inputs)
    return pipeline.run()
