"""``convsim-shrink sweep MODEL --targets 0.75,0.5,0.25,0.1``: the accuracy–size–latency curve in one run.

    dense model (trained once, or taken as given) ─▶ dense latency (once)
        └─▶ for each target: prune a copy ─▶ fine-tune ─▶ evaluate ─▶ latency ─▶ save the point's model

The dense model comes from the runner's own stages (:class:`~convsim_shrink.pipeline.runner.Runner`: build,
CS pre-minimisation, training; a checkpoint or ``--weights`` skips the last two as in the main
command), so a sweep's dense model is the one the main command would prune.  Every point is pruned
from that one dense model by :func:`~convsim_shrink.pipeline.stages.prune_stage` with one
:class:`~convsim_shrink.pipeline.stages.PruneReuse` (calibration gradients, compensation statistics, the plan of
layers left alone and, for latency targets, the dense latency are measured once) and fine-tuned by
:func:`~convsim_shrink.pipeline.stages.finetune_stage` with the recipe's budget (``--finetune-epochs``).

The run directory holds, besides the runner's files (``recipe.yaml``, ``state.json``,
``dense.safetensors``): ``sweep.json`` (written atomically after every point: a stopped sweep continues
with ``convsim-shrink sweep --resume RUN`` at the first unfinished point), ``sweep.md``, ``sweep.csv``,
``sweep.png`` (at the end: top-1 against parameters, MACs and latency, the dense model marked) and
``points/<kind>-<target>/model.safetensors`` (and the recipe's export formats with ``--export``).

Latencies are medians of timed forward passes (:func:`~convsim_shrink.measure.latency.measure_latency`, fp32,
on the run's device) at batch 1 and at the latency batch (``prune.latency_batch``, else the
fine-tuning batch); the dense model's are measured once at the start of the sweep.  Under ``torchrun``
every process prunes and fine-tunes (its shard of the data), rank 0 measures latency and writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..console import console
from ..errors import CheckpointError, ConfigError, TargetUnreachableError
from ..io import atomic_path, atomic_write_text
from .runner import STEPS, Runner

#: what a sweep's targets are fractions of
KINDS = ("params", "macs", "latency")


# ------------------------------------------------------------------------------------------ input


def parse_targets(text: str | None) -> list[float]:
    """``"0.75,0.5,0.25"`` -> ``[0.75, 0.5, 0.25]`` (in the order given).

    Raises :class:`ConfigError` (one line) for an empty list, a value that is not a number, a value
    outside (0, 1) or a value given twice."""
    items = [s.strip() for s in (text or "").split(",")]
    if not any(items):
        raise ConfigError("--targets is empty: give fractions between 0 and 1 separated by commas, e.g. --targets 0.75,0.5,0.25,0.1")
    out: list[float] = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--targets: '{item}' is not a number; give fractions between 0 and 1 separated by commas, "
                              "e.g. --targets 0.75,0.5,0.25,0.1") from None
        if not (math.isfinite(value) and 0 < value < 1):
            raise ConfigError(f"--targets: {item} is out of range; every target is a fraction strictly between 0 and 1, e.g. 0.5")
        if value in out:
            raise ConfigError(f"--targets: {item} is given twice; give each target once")
        out.append(value)
    return out


def parse_kind(kind: str) -> str:
    """``--target-kind``: one of :data:`KINDS`; raises :class:`ConfigError` otherwise."""
    if kind not in KINDS:
        from ..errors import unknown

        raise unknown("--target-kind", kind, KINDS)
    return kind


def parse_max_drop(text: str) -> float:
    """``--max-drop D``: D points of top-1 (a number >= 0); raises :class:`ConfigError` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--max-drop '{text}' is not a number; give the points of top-1 you accept to lose, e.g. --max-drop 0.5") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"--max-drop {text} is out of range; give points of top-1 >= 0, e.g. --max-drop 0.5")
    return value


# ------------------------------------------------------------------------------------------ state


@dataclass
class SweepPoint:
    """One target's result.  Sizes are absolute (params, MACs per image) and as fractions of the dense
    model; latencies in milliseconds per batch (median); top-1 in percent on the test split (and the
    validation split when the recipe has one); ``seconds``: the point's wall time (prune, fine-tune,
    evaluation, latency, saving).  ``note``: why the point has no model (an unreachable target)."""

    target: float
    params: int | None = None
    macs: int | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    latency_b1_ms: float | None = None
    latency_batch_ms: float | None = None
    latency_ratio: float | None = None  # at the latency batch, of the dense model's
    top1_before_finetune: float | None = None
    top1: float | None = None
    val_top1: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    model: str | None = None  # the point's model file, relative to the run directory
    exports: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    latency_warning: str | None = None


@dataclass
class SweepState:
    """``sweep.json``: the sweep's settings, the dense model's row and the finished points."""

    model: str
    dataset: str
    kind: str
    targets: list[float]
    finetune_epochs: int
    latency_batch: int
    test_images: int | None = None
    val_images: int | None = None
    dense: dict[str, Any] = field(default_factory=dict)  # params, macs, top1, val_top1, latency_b1_ms, latency_batch_ms
    points: list[SweepPoint] = field(default_factory=list)
    dense_seconds: float | None = None
    calibrations: int = 0  # times the dense model was calibrated for pruning (1 for a whole sweep in one process)
    finished: bool = False

    def point(self, target: float) -> SweepPoint | None:
        return next((p for p in self.points if p.target == target), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepState:
        data = dict(data)
        data["points"] = [SweepPoint(**p) for p in data.get("points", [])]
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> SweepState:
        """Read ``sweep.json``; raises :class:`CheckpointError` for a missing or damaged file."""
        if not path.is_file():
            raise CheckpointError(f"{path.parent} is not a sweep's run directory (no sweep.json); give the folder a sweep printed at its start")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError):
            raise CheckpointError(f"{path} is damaged; start a new sweep") from None


def point_name(kind: str, target: float) -> str:
    """The folder of a point's model: ``params-0.5``."""
    return f"{kind}-{target:g}"


# ------------------------------------------------------------------------------------------ output


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table_rows(state: SweepState) -> list[list[str]]:
    """The table's rows as text, the dense model first, then the points in the order of the targets:
    target, params (ratio), MACs (ratio), latency batch 1, latency at the latency batch, top-1 before and
    after fine-tuning, validation top-1, seconds."""
    d = state.dense
    rows = [["dense", _f(d.get("params"), ","), _f(d.get("macs"), ","), _f(d.get("latency_b1_ms"), ".2f"),
             _f(d.get("latency_batch_ms"), ".2f"), "", _f(d.get("top1"), ".2f"), _f(d.get("val_top1"), ".2f"),
             _f(state.dense_seconds, ".0f")]]
    for t in state.targets:
        p = state.point(t)
        if p is None:
            rows.append([f"{t:g}", *["(pending)"] + [""] * 7])
            continue
        rows.append([
            f"{t:g}",
            f"{_f(p.params, ',')} ({_f(p.params_ratio, '.3f')})", f"{_f(p.macs, ',')} ({_f(p.macs_ratio, '.3f')})",
            _f(p.latency_b1_ms, ".2f"), _f(p.latency_batch_ms, ".2f"), _f(p.top1_before_finetune, ".2f"), _f(p.top1, ".2f"),
            _f(p.val_top1, ".2f"), _f(p.seconds, ".0f"),
        ])
    return rows


def _headers(state: SweepState) -> list[str]:
    return [f"{state.kind} target", "params (ratio)", "MACs (ratio)", "latency b1 ms", f"latency b{state.latency_batch} ms",
            "top-1 before ft", f"top-1 after {state.finetune_epochs} ep", "val top-1", "seconds"]


def write_outputs(state: SweepState, run_dir: Path, *, plot_too: bool = True) -> dict[str, str]:
    """``sweep.json``, ``sweep.csv``, ``sweep.md`` and (``plot_too``) ``sweep.png`` into ``run_dir``
    (each atomically); returns their paths by name."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "sweep.json", json.dumps(state.to_dict(), indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target", "kind", "params", "params_ratio", "macs", "macs_ratio", "latency_b1_ms", "latency_batch_ms",
                "latency_batch", "top1_before_finetune", "top1", "val_top1", "finetune_epochs", "seconds", "model", "note"])
    d = state.dense
    w.writerow(["dense", state.kind, d.get("params"), 1.0, d.get("macs"), 1.0, d.get("latency_b1_ms"), d.get("latency_batch_ms"),
                state.latency_batch, "", d.get("top1"), d.get("val_top1"), "", state.dense_seconds, "dense.safetensors", ""])
    for t in state.targets:
        p = state.point(t)
        if p is not None:
            w.writerow([p.target, state.kind, p.params, p.params_ratio, p.macs, p.macs_ratio, p.latency_b1_ms, p.latency_batch_ms,
                        state.latency_batch, p.top1_before_finetune, p.top1, p.val_top1, p.epochs, p.seconds, p.model, p.note or ""])
    atomic_write_text(run_dir / "sweep.csv", buf.getvalue())
    head = _headers(state)
    lines = [
        f"# convsim-shrink sweep: {state.model} on {state.dataset}",
        "",
        f"Every point pruned to its {state.kind} target from one dense model and fine-tuned {state.finetune_epochs} epoch(s). "
        f"Top-1 in % on {state.test_images or 'the'} test images"
        + (f" (validation: {state.val_images} held-out training images)" if state.val_images else "")
        + f"; latency: median ms per batch (fp32), dense measured once. {len(state.points)} of {len(state.targets)} points done.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(row) + " |" for row in table_rows(state)],
        "",
        *[f"Note ({p.target:g}): {p.note}  " for p in state.points if p.note],
        *[f"Timing ({p.target:g}): {p.latency_warning}  " for p in state.points if p.latency_warning],
        "",
        "![top-1 against size and latency](sweep.png)",
        "",
    ]
    atomic_write_text(run_dir / "sweep.md", "\n".join(lines))
    if plot_too:
        plot(state, run_dir / "sweep.png")
    return {name: str(run_dir / f"sweep.{name}") for name in ("json", "csv", "md", *(["png"] if plot_too else []))}


def plot(state: SweepState, path: Path) -> Path:
    """One figure of three panels: top-1 after fine-tuning (and, faint, before) against parameters, MACs
    and latency at the latency batch; the dense model is a star, each point labelled with its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = state.dense
    done = [p for p in (state.point(t) for t in state.targets) if p is not None and p.top1 is not None]
    panels = [("params", "parameters (M)", 1e-6), ("macs", "MACs per image (M)", 1e-6),
              ("latency_batch_ms", f"latency at batch {state.latency_batch} (ms)", 1.0)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (key, label, scale) in zip(axes, panels):
        pts = sorted((p for p in done if getattr(p, key) is not None), key=lambda p: getattr(p, key))
        xs = [getattr(p, key) * scale for p in pts]
        ax.plot(xs, [p.top1 for p in pts], "o-", color="tab:blue", label=f"after fine-tuning ({state.finetune_epochs} ep)")
        before = [(x, p.top1_before_finetune) for x, p in zip(xs, pts) if p.top1_before_finetune is not None]
        if before:
            ax.plot(*zip(*before), "o", mfc="none", color="tab:gray", alpha=0.7, label="before fine-tuning")
        for x, p in zip(xs, pts):
            ax.annotate(f"{p.target:g}", (x, p.top1), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if d.get(key) is not None and d.get("top1") is not None:
            ax.plot([d[key] * scale], [d["top1"]], "*", ms=14, color="tab:red", label="dense")
            ax.axhline(d["top1"], color="tab:red", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(f"{state.model} on {state.dataset}: pruned to {state.kind} targets (labels: the target)", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def print_table(state: SweepState) -> None:
    """The sweep's table on the console (rich)."""
    from rich.table import Table

    d = state.dense
    table = Table(title=f"{state.model} on {state.dataset}: {state.kind} sweep, {state.finetune_epochs} fine-tuning epoch(s) per point; "
                        f"dense {_f(d.get('params'), ',')} params, {_f(d.get('macs'), ',')} MACs")
    val = state.val_images is not None
    heads = [state.kind, "params", "MACs", "ms b1", f"ms b{state.latency_batch}", "top-1 pre-ft", "top-1", *(["val"] if val else []), "s"]
    for i, h in enumerate(heads):
        table.add_column(h, justify="left" if i == 0 else "right")
    table.add_row("dense", "1", "1", _f(d.get("latency_b1_ms"), ".2f"), _f(d.get("latency_batch_ms"), ".2f"), "", _f(d.get("top1"), ".2f"),
                  *([_f(d.get("val_top1"), ".2f")] if val else []), _f(state.dense_seconds, ".0f"))
    for t in state.targets:
        p = state.point(t) or SweepPoint(t, note="pending")
        table.add_row(f"{t:g}", _f(p.params_ratio, ".3f"), _f(p.macs_ratio, ".3f"), _f(p.latency_b1_ms, ".2f"), _f(p.latency_batch_ms, ".2f"),
                      _f(p.top1_before_finetune, ".2f"), _f(p.top1, ".2f"), *([_f(p.val_top1, ".2f")] if val else []), _f(p.seconds, ".0f"))
    console.print(table)


# ------------------------------------------------------------------------------------------ run


class SweepRunner(Runner):
    """A sweep: the runner's dense stages, then one point per target (module docstring).

    ``targets`` (fractions in (0, 1)) and ``kind`` (:data:`KINDS`) are checked before anything is
    written; ``export``: write each point's model in the recipe's export formats too (else only
    ``model.safetensors``).  ``resume``: continue the sweep in ``run_dir`` (its ``sweep.json`` gives the
    targets and kind; ``targets``/``kind`` are then ignored)."""

    def __init__(self, recipe, run_dir, *, targets: list[float] | None = None, kind: str = "params", export: bool = False,
                 resume: bool = False, epochs_asked: int | None = None, **kw):
        run_dir = Path(run_dir)
        if resume:
            saved = SweepState.load(run_dir / "sweep.json")
            targets, kind = saved.targets, saved.kind
        if not targets:
            raise ConfigError("a sweep needs targets, e.g. --targets 0.75,0.5,0.25,0.1")
        parse_targets(",".join(map(str, targets)))
        parse_kind(kind)
        # the points set their own targets; a recipe's size search does not apply to a sweep
        recipe = recipe.model_copy(update={"prune": recipe.prune.model_copy(update={"max_accuracy_drop": None})})
        super().__init__(recipe, run_dir, resume=resume, epochs_asked=epochs_asked, **kw)
        self.targets, self.kind, self.export = list(targets), kind, export
        self.sweep: SweepState | None = None

    def _write(self, plot_too: bool = False) -> None:
        """The tables after every point (a stopped sweep keeps them), the plot at the end (a few seconds)."""
        from ..train.distributed import is_main_process

        if is_main_process():
            write_outputs(self.sweep, self.run_dir, plot_too=plot_too)

    def _start_sweep(self) -> SweepState:
        from . import stages

        r, data = self.recipe, self.data
        path = self.run_dir / "sweep.json"
        if self.resume and path.is_file():
            return SweepState.load(path)
        return SweepState(
            model=r.model.name, dataset=data.info.name, kind=self.kind, targets=self.targets, finetune_epochs=r.finetune.epochs,
            latency_batch=stages.latency_batch_size(r.prune, r.finetune, data),
            test_images=getattr(data.test, "num_samples", None), val_images=getattr(data.val, "num_samples", None) if data.val else None,
        )

    def _latency(self, model) -> tuple[float, float, str | None]:
        """ms at batch 1 and at the latency batch (rank 0 measures; every rank gets its numbers), and a
        warning line when the timings spread too widely to trust."""
        from ..measure.latency import measure_latency
        from ..train.distributed import from_rank0

        shape = tuple(self.example_inputs.shape[1:])
        out, warning = [], None
        for batch in (1, self.sweep.latency_batch):
            lat = from_rank0(lambda m, b=batch: measure_latency(m, shape, b, device=self.device))(model)
            out.append(float(getattr(lat, "seconds", lat)) * 1000)
            warning = warning or (lat.spread_warning() if hasattr(lat, "spread_warning") else None)
        return out[0], out[1], warning

    def _dense_row(self) -> None:
        from ..train import evaluate
        from . import stages

        s, m = self.sweep, self.state.metrics
        if s.dense:
            return
        precision = stages.eval_precision(self.device, self.recipe.finetune)
        b1, bb, _ = self._latency(self.dense)
        s.dense = {
            "params": m.dense_size.params, "macs": m.dense_size.macs, "top1": m.dense_accuracy,
            "val_top1": evaluate(self.dense, self.data.val, precision)["acc"] if self.data.val is not None else None,
            "latency_b1_ms": b1, "latency_batch_ms": bb,
        }
        s.dense_seconds = round(sum(self.state.seconds.values()), 3)

    def _point(self, target: float, progress, task) -> SweepPoint:
        from ..train import distributed, evaluate
        from . import stages
        from .sizesearch import size_target_config

        r, s = self.recipe, self.sweep
        t0 = time.perf_counter()
        cfg = size_target_config(r.prune, s.kind, target)
        progress.update(task, info=f"{s.kind} {target:g}: pruning")
        try:
            pruned = stages.prune_stage(self.dense, self.data, cfg, example_inputs=self.example_inputs, finetune=r.finetune,
                                        device=self.device, quiet=True, reuse=self.prune_reuse)
        except TargetUnreachableError as exc:
            return SweepPoint(target, note=str(exc), seconds=round(time.perf_counter() - t0, 3))
        distributed.agree_on_model(pruned.model, f"the model pruned to {s.kind} {target:g}")
        progress.update(task, info=f"{s.kind} {target:g}: fine-tuning {r.finetune.epochs} epoch(s)")
        out = stages.finetune_stage(pruned.model, self.dense, self.data, r.finetune, device=self.device, quiet=True)
        distributed.agree_on_model(out.model, f"the model fine-tuned at {s.kind} {target:g}")
        progress.update(task, info=f"{s.kind} {target:g}: latency")
        b1, bb, warning = self._latency(out.model)
        val = evaluate(out.model, self.data.val, stages.eval_precision(self.device, r.finetune))["acc"] if self.data.val is not None else None
        folder = self.run_dir / "points" / point_name(s.kind, target)
        exports: dict[str, str] = {}
        if distributed.is_main_process():
            fmt = r.export if self.export else r.export.model_copy(update={"formats": ["convsim"]})
            metrics = {"sweep_target": {s.kind: target}, "top1": out.accuracy, "top1_before_finetune": pruned.accuracy}
            done = stages.export_stage(out.model, fmt, folder, example_inputs=self.example_inputs, recipe=r.model_copy(
                update={"prune": cfg}).to_dict(), metrics=metrics, data=self.data.unsharded())
            exports = {k: str(Path(v).relative_to(self.run_dir)) for k, v in done.exports.items()}
        res = pruned.result
        return SweepPoint(
            target, params=res.pruned.params, macs=res.pruned.macs, params_ratio=res.params_ratio, macs_ratio=res.macs_ratio,
            latency_b1_ms=b1, latency_batch_ms=bb, latency_ratio=bb / s.dense["latency_batch_ms"] if s.dense.get("latency_batch_ms") else None,
            top1_before_finetune=pruned.accuracy, top1=out.accuracy, val_top1=val, epochs=r.finetune.epochs,
            seconds=round(time.perf_counter() - t0, 3), model=exports.get("convsim") or exports.get("pickle"), exports=exports,
            latency_warning=warning,
        )

    def _run_stages(self):
        from ..train import distributed, make_progress, resolve_precision
        from ..train.distributed import is_main_process

        self.prepare()
        r = self.recipe
        self.state.processes = p = distributed.describe(r.train.batch_size, self.device)
        self.log(f"device: {resolve_precision(self.device, r.train.precision, r.train.channels_last).describe()}"
                 + (f"; {p['world_size']} processes ({p['backend']}), global batch {p['global_batch']}" if p["world_size"] > 1 else ""))
        self.log(f"sweep over {self.kind} targets {', '.join(f'{t:g}' for t in self.targets)}; {r.finetune.epochs} fine-tuning "
                 f"epoch(s) per point" + (f"; run directory: {self.run_dir}" if self.run_dir else ""))
        self.sweep = self._start_sweep()
        self._write()  # sweep.json from the start: --resume knows the targets however early the run stops
        self._run_steps(tuple(s for s in STEPS if s.name in ("build", "premin", "train")))
        self._dense_row()
        self._write()
        progress = make_progress(self.quiet)
        todo = [t for t in self.sweep.targets if self.sweep.point(t) is None]
        with progress:
            task = progress.add_task("sweep", total=len(self.sweep.targets), completed=len(self.sweep.targets) - len(todo), info="")
            for target in todo:
                point = self._point(target, progress, task)
                self.sweep.points.append(point)
                self.sweep.calibrations += self.prune_reuse.calibrations
                self.prune_reuse.calibrations = 0
                self._write()
                progress.advance(task)
                if point.note:
                    console.print(f"note: {point.note}", soft_wrap=True, markup=False)
                else:
                    self.log(f"{self.kind} {target:g}: {point.params_ratio:.3f} of the params, {point.macs_ratio:.3f} of the MACs, "
                             f"top-1 {point.top1_before_finetune:.2f} -> {point.top1:.2f} ({point.seconds:.0f} s)")
        self.sweep.finished = True
        self._write(plot_too=True)
        if is_main_process():
            print_table(self.sweep)
            console.print(f"sweep: {self.run_dir / 'sweep.md'} (plot: {self.run_dir / 'sweep.png'})")
        self.sweep = SweepState.from_dict(distributed.broadcast_json(self.sweep.to_dict()))
        return self.sweep


def run_sweep(recipe, run_dir, *, targets: list[float] | None = None, kind: str = "params", export: bool = False,
              resume: bool = False, epochs_asked: int | None = None) -> SweepState:
    """Run (or, with ``resume``, continue) a sweep; see :class:`SweepRunner`.  Returns the sweep's state
    (``sweep.json``'s content).  Raises :class:`ConfigError` for bad targets or kind before anything is
    written, and what the runner's stages raise."""
    return SweepRunner(recipe, run_dir, targets=targets, kind=kind, export=export, resume=resume, epochs_asked=epochs_asked).run()


__all__ = ["KINDS", "SweepPoint", "SweepRunner", "SweepState", "parse_kind", "parse_max_drop", "parse_targets", "plot", "run_sweep",
           "table_rows", "write_outputs"]
