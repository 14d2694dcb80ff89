"""The runner: the only place that knows the stage order, skips finished stages and resumes.

    build -> premin (CS pre-minimisation) -> train -> prune (rank + cut to a measured size)
          -> finetune -> export -> report

Each stage is a function in :mod:`.stages`; the runner hands it its inputs, records its outcome in the
typed :class:`~convsim_shrink.pipeline.state.RunState` (``state.json``, written atomically after every stage)
and saves the model it made into the run directory.  A resumed run skips the finished stages and
reloads the last model each left on disk; training stages checkpoint every epoch, so an interrupted
run loses at most one epoch.  :func:`shrink` is the Python API's entry point to the same runner.

Where the model comes from (``model.name``): a zoo name, ``torchvision:NAME``, ``timm:NAME``, an import
string ``package.module:function`` or a checkpoint (:func:`~convsim_shrink.sources.resolve_source`),
or any ``nn.Module`` given to the Python API.  It is resolved in :meth:`Runner.prepare`, before anything
is written.  A model that arrives with trained weights (a checkpoint, ``model.weights``, the Python
API's ``pretrained=True``) skips pre-minimisation and dense training unless epochs were asked for
(:func:`~convsim_shrink.models.adapt.dense_stages`); the decision is written into the run's ``recipe.yaml``
(``premin.steps``/``train.epochs``), so a resumed run follows it.  A half-precision model is trained,
pruned and exported in float32; the Python API hands the shrunk model back in its own dtype.

Under ``torchrun`` every process runs every stage on its shard of the data (:mod:`.train.distributed`):
an error while preparing on any rank stops all of them with its message; after each stage that changes
the model every rank is checked to hold the same architecture and given rank 0's values; only rank 0
writes (run directory, state, models, exports, report) and the others receive its report at the end.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from ..console import console
from ..data import DataBundle, DataInfo
from ..errors import CheckpointError, ConfigError, ConvSimError
from ..export import native
from ..export.load import load
from ..io import atomic_write_text
from ..models.adapt import dense_stages, restore_dtype, to_float32
from ..prune.ranking import get_criterion
from ..prune.safety import GraphLimits, graph_limits
from ..recipe import Recipe, resolve
from ..sources import parse_spec, resolve_source
from ..train import (
    distributed,
    is_channels_last,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_memory_format,
)
from ..train.distributed import is_main_process
from ..train.progress import duration_text
from .preflight import check_model, check_run
from .report import build_report, write_report
from .stages import (
    PruneReuse,
    build_stage,
    example_inputs_for,
    export_stage,
    finetune_stage,
    is_registered,
    latency_batch_size,
    premin_stage,
    prepare_data,
    prune_stage,
    train_stage,
)
from .state import ModelSize, RunState


@dataclass(frozen=True)
class _Step:
    """One stage of :data:`STEPS`: its name, the :class:`Runner` method that runs it (returning its seconds,
    or None to have them timed) and what resuming needs to know about it."""

    name: str
    run: Callable[[Runner], float | None]
    artefact: str | None = None  # the model file the stage leaves in the run directory
    restores: tuple[str, ...] = ()  # the runner's models that file stands for when resuming
    changes_model: bool = True
    needs_run_dir: bool = False  # skipped when the run has no directory (Python API without run_dir)
    main_only: bool = False  # under torchrun only rank 0 runs it (it only writes files)


def resumable(completed: list[str]) -> list[str]:
    """The finished stages a resumed run may skip: the finished prefix of :data:`STAGES`, less trailing
    stages whose model lived only in memory."""
    keep: list[_Step] = []
    for step in STEPS:
        if step.name not in completed:
            break
        keep.append(step)
    while keep and keep[-1].artefact is None and keep[-1].changes_model:
        keep.pop()
    return [step.name for step in keep]


@dataclass
class ShrinkResult:
    model: nn.Module
    dense_model: nn.Module | None
    report: dict[str, Any]
    run_dir: Path | None


def default_run_dir(model_name: str) -> Path:
    """``runs/<model>-<timestamp>``; a path or ``source:NAME`` becomes a plain folder name
    (``runs/dense-...`` for ``runs/x/dense.safetensors``, ``runs/torchvision-resnet18-...``)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = model_name.rstrip("/\\")
    if "/" in name or "\\" in name or name.endswith(".safetensors"):
        name = Path(name).stem or "model"
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.") or "model"
    return Path("runs") / f"{name}-{stamp}"


#: seconds the report's dense-vs-shrunk timing may take per batch size (a slow model is timed fewer times)
SPEED_BUDGET_S = 20.0


def machine_kind(precision) -> str:
    """``'cuda'``, ``'cpu-bf16'`` or ``'cpu-fp32'``: the keys of a recipe's ``expected_minutes``."""
    if precision.device.type == "cuda":
        return "cuda"
    return f"{precision.device.type}-{'bf16' if precision.dtype is not None else 'fp32'}"


def chance_note(accuracy: float | None, classes: int | None) -> str | None:
    """A note when the dense top-1 (%) is near chance for ``classes`` classes (below 1.5x chance, and
    within 10 points of it): what pruning then keeps or loses says nothing."""
    if accuracy is None or not classes or classes < 2:
        return None
    chance = 100.0 / classes
    if accuracy >= min(1.5 * chance, chance + 10.0):
        return None
    return (f"the dense model is near chance ({accuracy:.2f}% top-1 for {classes} classes, chance {chance:.3g}%): the "
            "shrunk model's accuracy will say little; train longer (--epochs), or check the data and train.lr")


def runs_as_written(recipe: Recipe) -> bool:
    """Whether the stages that take the time (model, data, pre-minimisation, training, fine-tuning) are
    set as in the recipe file the run came from, with no command-line or ``--set`` change to them."""
    source = recipe.run.recipe_source
    if not source:
        return False
    try:
        written = resolve(source.split(" (shipped: ")[0])
    except ConvSimError:
        return False
    return all(getattr(recipe, s) == getattr(written, s) for s in ("model", "data", "premin", "train", "finetune"))


def expected_minutes(recipe: Recipe, precision) -> float | None:
    """What the recipe as written took on this kind of machine where it was measured (its
    ``expected_minutes``), or None: no measurement for this kind, or the run changes a stage that takes time."""
    minutes = recipe.expected_minutes.get(machine_kind(precision))
    return minutes if minutes is not None and runs_as_written(recipe) else None


def expected_text(recipe: Recipe, precision) -> str:
    """``'; expected: about 28 min (...)'`` (:func:`expected_minutes`), or ``''``."""
    minutes = expected_minutes(recipe, precision)
    if minutes is None:
        return ""
    return f"; expected: about {minutes:g} min (the recipe as written, measured on a 2-core {machine_kind(precision)} machine)"


SLOW_FACTOR = 1.25  # a run this much past its expected time says so, once


def slow_note(elapsed_s: float, expected_min: float | None) -> str | None:
    """The note for a run past :data:`SLOW_FACTOR` times its expected minutes (None when it is not, or has
    no expectation)."""
    if expected_min is None or elapsed_s <= SLOW_FACTOR * expected_min * 60:
        return None
    return (f"this run has taken {duration_text(elapsed_s)} so far, past the about {expected_min:g} min expected for this recipe "
            "on this kind of machine: the CPU is slower, or other jobs share it (compare the epochs' img/s); the run goes on")


class SlowRunWatch:
    """Prints :func:`slow_note` once, when the run passes :data:`SLOW_FACTOR` times ``expected_min`` (a timer
    thread: the mark passes in the middle of a stage, and a fresh user should hear it then, not at the end).
    Nothing when ``expected_min`` is None.  ``stop()`` cancels it."""

    def __init__(self, expected_min: float | None, say: Callable[[str], None]):
        self.expected_min, self.say, self.said = expected_min, say, False
        self.started = time.perf_counter()
        self._timer: threading.Timer | None = None

    def start(self) -> SlowRunWatch:
        if self.expected_min is not None:
            self._timer = threading.Timer(SLOW_FACTOR * self.expected_min * 60, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _fire(self) -> None:
        note = slow_note(time.perf_counter() - self.started + 1e-3, self.expected_min)
        if note is not None and not self.said:
            self.said = True
            self.say(f"note: {note}")

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Runner:
    """One run of the pipeline for a resolved :class:`Recipe`.

    ``model``/``data`` may be given (Python API: any ``nn.Module`` and any loaders); otherwise they
    come from the recipe.  Nothing is written before :meth:`prepare` has validated the model name and
    the criterion and found the data.  Without a run directory nothing is written at all.
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
        pretrained: bool = False,
        epochs_asked: int | None = None,
    ):
        """``pretrained``: the given ``model`` arrives with trained weights (models the recipe names say
        so themselves).  ``epochs_asked``: dense training epochs the user asked for explicitly (``--epochs``),
        which a pretrained model then trains for; otherwise it is not trained before pruning."""
        self.recipe = recipe
        self.quiet = recipe.run.quiet
        self.run_dir = Path(run_dir) if run_dir else (Path(recipe.run.out) if recipe.run.out else None)
        self.resume = resume
        self.given_model = model
        self.data = data
        self.example_inputs = example_inputs
        self.state = RunState()
        self.device = distributed.bind_device(resolve_device(recipe.run.device))  # cuda:LOCAL_RANK under torchrun
        self.model: nn.Module | None = None  # the model the next stage works on
        self.dense: nn.Module | None = None  # the trained dense model (the teacher)
        self.pretrained = pretrained
        self.epochs_asked = epochs_asked
        self.source = None  # sources.Source of a model the recipe names outside the zoo's random weights
        self.dtype: torch.dtype | None = None  # the given model's half dtype, restored on the returned model
        self.channels_last = False  # the given model's 2-d kernels were channels_last: so are the returned model's
        self.prune_reuse = PruneReuse()  # the dense model's calibration and latency, measured once per run

    # ------------------------------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        if not self.quiet:
            console.print(msg)

    def _path(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir else None

    def _save_state(self) -> None:
        if self.run_dir and is_main_process():
            self.state.save(self.run_dir / "state.json")

    def _save_model(self, model: nn.Module, name: str) -> None:
        path = self._path(name)
        if path is not None and is_registered(model) and is_main_process():
            native.save(
                model.cpu(), path, recipe=self.recipe.to_dict(), metrics=self.state.metrics.to_dict(),
                input_shape=tuple(self.example_inputs.shape[1:]),
            )
            model.to(self.device)

    def _restore(self, files: dict[str, str]) -> None:
        """Load the model files of skipped stages into the slots they stand for (one object per file)."""
        loaded: dict[str, nn.Module] = {}
        for slot, name in files.items():
            if name not in loaded:
                path = self._path(name)
                if path is None or not path.is_file():
                    raise CheckpointError(f"cannot resume: {path} is missing; start a new run")
                loaded[name] = load(path).to(self.device)
            setattr(self, slot, loaded[name])

    # ---------------------------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """Validate everything that can fail on user input or the environment, then create the run
        directory (rank 0).  Under ``torchrun`` an error on any rank is raised on every rank."""
        failure = None
        try:
            self._validate()
        except ConvSimError as exc:
            failure = exc
        distributed.agree(failure)
        if self.run_dir is None or not is_main_process():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "recipe.yaml", self.recipe.to_yaml())
        self._save_state()

    def _validate(self) -> None:
        r = self.recipe
        check_run(r, self.run_dir, resume=self.resume)  # device, packages, output folder: before any work
        distributed.check_setup(r, self.device)  # the global batch divides by the processes
        # which source the recipe names (a typo of a zoo name fails here, before the data is read)
        spec = parse_spec(r.model.name) if self.given_model is None else None
        zoo = spec is not None and spec.kind == "zoo" and r.model.weights is None
        get_criterion(r.prune.criterion).create(**r.prune.criterion_options)  # unknown criterion or option fails here
        if r.prune.max_accuracy_drop is not None and self.data is None and not self.resume:
            from .sizesearch import with_validation

            # the size search chooses on validation: held out of training when the recipe has no split
            self.recipe, self.state.metrics.validation_note = with_validation(r)
            r = self.recipe
        if self.data is None:
            self.data = prepare_data(r)
        if hasattr(self.data.train, "__len__") and len(self.data.train) == 0:
            raise ConfigError("the training data gives no batch (empty, or smaller than one batch with drop_last); add images or lower the batch size")
        if r.prune.max_accuracy_drop is not None and self.data.val is None:
            raise ConfigError("prune.max_accuracy_drop chooses on a validation split and the data has none; set data.val_split or pass validation data")
        for note in self.data.notes:  # what was skipped while reading the data: also under --quiet
            console.print(f"note: {escape(note)}", soft_wrap=True)
        if self.example_inputs is None:
            self.example_inputs = example_inputs_for(self.data.info)
        if self.given_model is None and not zoo:
            info = self.data.info
            seed_everything(r.run.seed)
            self.source = resolve_source(r.model.name, num_classes=info.num_classes or None, in_channels=info.in_channels, weights=r.model.weights,
                                         width=r.model.width, small_input=r.model.small_input)
            self.pretrained = self.pretrained or self.source.pretrained
        brought = self.given_model if self.given_model is not None else (self.source.model if self.source else None)
        if brought is not None:  # TorchScript, no parameters, or not running on the data: before any training
            check_model(brought, self.example_inputs)
        if not self.resume:
            self._dense_rule()
        if self.run_dir is None:
            return
        if self.resume:
            self.state = RunState.load(self.run_dir / "state.json")
            if self.given_model is not None:
                raise ConfigError("resuming is supported for registry models only; start the Python API run again")
            self.state.completed = resumable(self.state.completed)
            if "prune" in self.state.completed and (self.state.metrics.search or {}).get("target") is not None:
                self._take_winner()  # the size search chose the target before the run stopped

    def _dense_rule(self) -> None:
        """A pretrained model skips pre-minimisation and dense training unless epochs were asked for
        (:func:`~convsim_shrink.models.adapt.dense_stages`); the recipe is changed to say so."""
        r = self.recipe
        if not self.pretrained:
            return
        rule = dense_stages(True, epochs=self.epochs_asked, recipe_epochs=r.train.epochs, premin_steps=r.premin.steps)
        self.recipe = r.model_copy(update={
            "premin": r.premin.model_copy(update={"steps": 0}),
            "train": r.train.model_copy(update={"epochs": self.epochs_asked if rule.train else 0}),
        })
        self.state.metrics.dense_note = rule.note

    # ------------------------------------------------------------------------------ stage calls
    # Each hands a stage its inputs and records its outcome; it returns the seconds to record when
    # they differ from the call's wall time.

    def _build(self) -> float | None:
        r = self.recipe
        given = self.given_model if self.given_model is not None else (self.source.model if self.source else None)
        m = self.state.metrics
        m.source = self.source.description if self.source else ("the given model" + (", trained" if self.pretrained else "")
                                                             if self.given_model is not None else f"zoo model {r.model.name}, random weights")
        self.log(f"model: {m.source}")
        if given is not None:
            self.channels_last = is_channels_last(given)
            self.dtype = to_float32(given)
            if self.dtype is not None:
                m.dtype_note = f"the model came in {str(self.dtype).removeprefix('torch.')}: trained, pruned and exported in float32"
                console.print(f"note: {m.dtype_note}")
        if m.dense_note:
            self.log(f"note: {m.dense_note}")
        out = build_stage(
            r.model, self.data.info, seed=r.run.seed, example_inputs=self.example_inputs, device=self.device,
            model=given,
        )
        self.model = out.model
        self.state.metrics.dense_size = ModelSize(out.size.params, out.size.macs)
        self.state.metrics.cs_init = out.cs
        self.state.layers.channels_dense, self.state.layers.cs_init = out.channels, out.cs_layers
        return None

    def _premin(self) -> float | None:
        p = self.recipe.premin
        out = premin_stage(self.model, p, quiet=self.quiet)
        res = out.result
        if p.steps:
            self.log(f"CS pre-minimisation: {res.cs_before:.4g} -> {res.cs_after:.4g} in {res.steps} steps ({res.seconds:.1f} s)")
        self.state.metrics.cs_after_premin, self.state.metrics.premin_steps = out.cs, res.steps
        self.state.layers.cs_after_premin = out.cs_layers
        return res.seconds

    def _train(self) -> float | None:
        out = train_stage(
            self.model, self.data, self.recipe.train, device=self.device, checkpoint=self._path("train.pt"),
            resume=self.resume, quiet=self.quiet,
        )
        n = getattr(self.data.test, "num_samples", "the")
        self.log(f"dense model: {out.accuracy:.2f}% top-1 on {n} test images")
        note = chance_note(out.accuracy, getattr(self.data.info, "num_classes", None))
        if note:
            self.state.metrics.chance_note = note
            console.print(f"note: {note}", soft_wrap=True)
        self.dense = self.model
        self.state.history_train = out.history
        self.state.metrics.dense_accuracy, self.state.metrics.cs_after_train = out.accuracy, out.cs
        self.state.layers.cs_after_train = out.cs_layers
        return None

    def _search_size(self) -> None:
        """prune.max_accuracy_drop: find the size target first (:mod:`.sizesearch`), then prune to it."""
        from .sizesearch import SearchRecord, search_size

        m = self.state.metrics
        done = SearchRecord.from_dict(m.search) if m.search else None  # candidates of a run that stopped mid-search

        def keep(record: SearchRecord) -> None:
            m.search = record.to_dict()
            self._save_state()

        record = search_size(
            self.dense, self.data, self.recipe, example_inputs=self.example_inputs, device=self.device, reuse=self.prune_reuse,
            quiet=self.quiet, record=done, on_candidate=keep, log=self.log, held_out=m.validation_note is not None,
        )
        if record.note:
            console.print(f"note: {escape(record.note)}", soft_wrap=True)
        keep(record)
        self._take_winner()
        self.log(f"size search: {record.kind} {record.target:g} after {len(record.candidates)} candidates")

    def _take_winner(self) -> None:
        from .sizesearch import SearchRecord, winner_config

        record = SearchRecord.from_dict(self.state.metrics.search)
        self.recipe = self.recipe.model_copy(update={"prune": winner_config(self.recipe.prune, record)})

    def _prune(self) -> float | None:
        if self.recipe.prune.max_accuracy_drop is not None:
            self._search_size()
        pr = self.recipe.prune
        out = prune_stage(
            self.dense, self.data, pr, example_inputs=self.example_inputs, finetune=self.recipe.finetune,
            device=self.device, quiet=self.quiet, reuse=self.prune_reuse, say=self.log,
        )
        result = out.result
        if result.note:  # one clean line, also under --quiet, instead of Python's warning format
            console.print(f"note: {escape(result.note)}")
            self.state.metrics.prune_note = result.note
        if out.hint:
            self.log(f"note: {out.hint}")
        self.log(
            f"pruned with '{pr.criterion}' to {result.params_ratio:.3f} of the params, {result.macs_ratio:.3f} of the MACs "
            f"(the search pruned {result.trials} candidates): {out.accuracy:.2f}% before fine-tuning"
        )
        self.model = out.model
        m = self.state.metrics
        if out.plan is not None:
            m.pruning_plan = out.plan.to_dict()
            if out.plan.left_alone():  # layers a user would not expect to stay whole: one line, also under --quiet
                console.print(f"note: {escape(out.plan.summary())}", soft_wrap=True)
            else:
                self.log(f"pruning: {out.plan.summary()}")
        m.pruned_accuracy, m.channel_ratio = out.accuracy, result.channel_ratio
        if out.steps:
            m.prune_steps, m.prune_steps_split = dict(out.steps), out.steps_split
            moved = " -> ".join(f"{k} {v:.2f}" for k, v in out.steps.items())
            self.log(f"top-1 through pruning ({out.steps_split}): {moved}")
        if out.compensation is not None:
            m.compensation = out.compensation.summary()
            self.log(f"compensation: {m.compensation}")
        m.shrunk_size = ModelSize(result.pruned.params, result.pruned.macs)
        return None

    def _finetune(self) -> float | None:
        out = finetune_stage(
            self.model, self.dense, self.data, self.recipe.finetune, device=self.device,
            checkpoint=self._path("finetune.pt"), resume=self.resume, quiet=self.quiet,
        )
        self.state.history_finetune = out.history
        self.state.metrics.shrunk_accuracy, self.state.metrics.cs_shrunk = out.accuracy, out.cs
        self.state.layers.channels_shrunk, self.state.layers.cs_shrunk = out.channels, out.cs_layers
        if self.state.metrics.search and self.data.val is not None:  # the size search's winner after its full budget
            from .sizesearch import winner_finished

            self.state.metrics.search = winner_finished(self.state.metrics.search, out.model, self.data.val, self.recipe.finetune,
                                                        out.accuracy, self.device)
        return None

    def _export(self) -> float | None:
        if self.dense is not None:  # every run reports speed: dense vs shrunk, batch 1 and the latency batch
            from ..measure.latency import speed_rows

            pr, ft = self.recipe.prune, self.recipe.finetune
            rows = speed_rows(self.dense, self.model, tuple(self.example_inputs.shape[1:]), (1, latency_batch_size(pr, ft, self.data)),
                              device=self.device, time_budget=SPEED_BUDGET_S)
            self.state.metrics.speed = rows
            for row in rows:  # the numbers are in the summary; a timing warning in full only here
                if row.get("warning"):
                    self.log(f"note: speed at batch {row['batch']}: {row['warning']}")
        out = export_stage(
            self.model, self.recipe.export, self.run_dir, example_inputs=self.example_inputs,
            recipe=self.recipe.to_dict(), metrics=self.state.metrics.to_dict(), data=self.data.unsharded(),
        )
        self.state.exports = out.exports
        m = self.state.metrics
        m.onnx_max_abs_diff, m.pt2_max_abs_diff, m.int8 = out.onnx_max_abs_diff, out.pt2_max_abs_diff, out.int8
        return None

    # -------------------------------------------------------------------------------------- run

    def run(self) -> ShrinkResult:
        """Every stage not yet finished, in order; under ``torchrun`` inside the process group
        (:func:`~convsim_shrink.train.distributed.session`), in rank 0's run directory."""
        r = self.recipe
        limits = GraphLimits(seconds=r.prune.graph_seconds, memory_gb=r.prune.graph_memory_gb)
        with distributed.session(self.device, r.run.dist_timeout), graph_limits(limits):
            if distributed.world_size() > 1:  # each process may have made up its own default name
                chosen = distributed.broadcast_json(str(self.run_dir) if self.run_dir else None)
                self.run_dir = Path(chosen) if chosen else None
            return self._run_stages()

    def _run_stages(self) -> ShrinkResult:
        self.prepare()
        r = self.recipe
        self.state.processes = distributed.describe(r.train.batch_size, self.device)
        precision = resolve_precision(self.device, r.train.precision, r.train.channels_last)
        # a resumed run's clock restarts: no expectation to compare with
        watch = SlowRunWatch(None if self.resume else expected_minutes(r, precision),
                             lambda text: console.print(text, soft_wrap=True)).start()
        try:
            return self._run_stages_watched(precision)
        finally:
            watch.stop()

    def _run_stages_watched(self, precision) -> ShrinkResult:
        r = self.recipe
        self.log(f"device: {precision.describe()}" + expected_text(r, precision)
                 + (f"; run directory: {self.run_dir}" if self.run_dir else ""))
        self.log(f"recipe: {r.run.recipe_source or 'built-in defaults (no recipe file)'}")
        p = self.state.processes
        if p["world_size"] > 1:  # one process: the batch is simply train.batch_size, nothing to say
            self.log(f"processes: {p['world_size']} ({p['backend']}); global batch {p['global_batch']} = "
                     f"{p['world_size']} x {p['per_process_batch']} per process (train.batch_size is the global batch)")
        self._run_steps(STEPS)
        report = build_report(self.recipe, self.state, self.data) if is_main_process() else None
        if self.run_dir is not None and is_main_process():
            write_report(report, self.state, self.run_dir)
        if self.dtype is not None:  # the Python API gets the model back in the dtype it came in
            for model in {id(m): m for m in (self.model, self.dense) if m is not None}.values():
                restore_dtype(model, self.dtype)
        if self.channels_last:  # and in the memory format it came in (training leaves it contiguous)
            for model in {id(m): m for m in (self.model, self.dense) if m is not None}.values():
                set_memory_format(model, True)
        report = distributed.broadcast_json(report)  # the others wait here for rank 0's files
        return ShrinkResult(self.model, self.dense, report, self.run_dir)

    def _run_steps(self, steps: tuple[_Step, ...]) -> None:
        """The steps not yet finished, in order; the models of skipped ones are loaded from their files."""
        skipped: dict[str, str] = {}  # slot -> model file of the last finished stage that filled it
        for step in steps:
            if step.name in self.state.completed:
                skipped.update({slot: step.artefact for slot in step.restores})
                continue
            if (step.needs_run_dir and self.run_dir is None) or (step.main_only and not is_main_process()):
                continue
            self._restore(skipped)
            skipped = {}
            t0 = time.perf_counter()
            seconds = step.run(self)
            self.state.finish(step.name, time.perf_counter() - t0 if seconds is None else seconds)
            if step.changes_model:
                distributed.agree_on_model(self.model, f"the model after '{step.name}'")
            if step.artefact:
                self._save_model(self.model, step.artefact)
            self._save_state()
        self._restore(skipped)


# The stages in the order they run, each with the method that runs it (after the class, which defines them).
STEPS = (
    _Step("build", Runner._build),  # leaves no file: redone (with pre-minimisation, both cheap and seeded) on resume
    _Step("premin", Runner._premin, "premin.safetensors", ("model",)),
    _Step("train", Runner._train, "dense.safetensors", ("model", "dense")),
    _Step("prune", Runner._prune, "pruned.safetensors", ("model",)),
    _Step("finetune", Runner._finetune, "shrunk.safetensors", ("model",)),
    _Step("export", Runner._export, changes_model=False, needs_run_dir=True, main_only=True),
)

#: the stages in the order they run
STAGES = tuple(step.name for step in STEPS)


def shrink(
    model: nn.Module | str,
    train_data,
    val_data,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    pretrained: bool = False,
    epochs: int | None = None,
    weights: str | None = None,
    recipe: Recipe | dict | str | None = None,
    example_inputs: torch.Tensor | None = None,
    run_dir: str | Path | None = None,
    num_classes: int | None = None,
) -> ShrinkResult:
    """Shrink any ``nn.Module`` on your own loaders (iterables of ``(images, labels)`` batches): CS
    pre-minimisation, training, ranking, pruning and fine-tuning as the recipe says.

    ``model``: the module, or what the command line takes (a zoo name, ``torchvision:NAME``,
    ``timm:NAME``, ``package.module:function``, a checkpoint path; ``weights`` as ``--weights``), built
    for ``num_classes`` classes (needed except for checkpoints) and the inputs' channels.
    ``pretrained=True``: the module is already trained, so pre-minimisation (which rewrites trained
    kernels) and dense training are skipped, and the report's dense row is the model evaluated on
    ``val_data``; ``epochs`` trains it that many epochs first anyway.  Checkpoints and ``weights`` are
    pretrained by themselves.  A float16/bfloat16 module is trained and pruned in float32 and handed back
    in its dtype.  ``val_data`` is used for the reported accuracies.  With ``recipe`` None the built-in
    defaults are used.  Returns the shrunk model and the report (``result.report``).

    Raises :class:`~convsim_shrink.errors.ConvSimError` subclasses (one line) for what the user can fix.
    """
    from ..recipe import resolve

    overrides: dict[str, Any] = {}
    if target_params is not None:
        overrides["prune.target_params"] = target_params
    if target_macs is not None:
        overrides["prune.target_macs"] = target_macs
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if isinstance(model, str):
        overrides["model.name"], overrides["model.weights"] = model, weights
    elif weights is not None:
        raise ConfigError("weights= names weights for a model given by name; load them into your module yourself")
    resolved = resolve(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides=overrides)
    if example_inputs is None:
        x, _ = next(iter(val_data))
        example_inputs = x[:1]
    if isinstance(model, str) and num_classes is None and parse_spec(model).kind != "checkpoint":
        raise ConfigError(f"give num_classes= to build '{model}' for your data")
    info = DataInfo("custom", num_classes or 0, example_inputs.shape[1], example_inputs.shape[-1], (), (), pad=0)
    bundle = DataBundle(info, train_data, None, val_data)
    given = model if isinstance(model, nn.Module) else None
    return Runner(resolved, run_dir, model=given, data=bundle, example_inputs=example_inputs, pretrained=pretrained,
                  epochs_asked=epochs).run()
