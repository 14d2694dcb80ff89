"""The run report: report.json (machine-readable), report.md (for people), plots, and a rich table,
all built from the run's typed :class:`~convsim_shrink.pipeline.state.RunState`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write_text
from .state import RunState


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _target_text(target: dict) -> str:
    return ", ".join(f"{v:g} of the {k}" for k, v in target.items() if v is not None) or "none"


def build_report(recipe, state: RunState, data) -> dict[str, Any]:
    """report.json's content: the recipe's choices and what ``state`` measured (None where not measured)."""
    m = state.metrics
    dense_size, shrunk_size = m.dense_size, m.shrunk_size
    dense_params = dense_size.params if dense_size else None
    shrunk_params = shrunk_size.params if shrunk_size else None
    plan = m.pruning_plan or {}
    return {
        "model": recipe.model.name,
        "source": m.source,
        "recipe": recipe.run.recipe_source,
        # the zoo's width multiplier; None for a model from elsewhere (a checkpoint, torchvision, timm, yours)
        "width": recipe.model.width if (m.source or "").startswith("zoo model") else None,
        "dataset": getattr(getattr(data, "info", None), "name", recipe.data.name),
        "test_images": getattr(getattr(data, "test", None), "num_samples", None),
        "criterion": recipe.prune.criterion,
        "global_pruning": recipe.prune.global_pruning,
        "distill": recipe.finetune.distill,
        "finetune_epochs": recipe.finetune.epochs,
        "target": {"params": recipe.prune.target_params, "macs": recipe.prune.target_macs,
                   "latency": recipe.prune.target_latency},
        "dense": {"params": dense_params, "macs": dense_size.macs if dense_size else None, "accuracy": m.dense_accuracy,
                  "note": m.dense_note},
        "shrunk": {
            "params": shrunk_params,
            "macs": shrunk_size.macs if shrunk_size else None,
            "accuracy": m.shrunk_accuracy,
            "accuracy_before_finetune": m.pruned_accuracy,
        },
        # top-1 through the prune stage: dense -> channels dropped -> compensated -> BN re-estimated (prune.step_accuracy)
        "prune_steps": {"split": m.prune_steps_split, **m.prune_steps} if m.prune_steps else None,
        "compensate": recipe.prune.compensate,
        "compensation": m.compensation,
        "params_ratio": _ratio(shrunk_params, dense_params),
        "macs_ratio": _ratio(shrunk_size.macs if shrunk_size else None, dense_size.macs if dense_size else None),
        "accuracy_delta": (m.shrunk_accuracy - m.dense_accuracy) if m.shrunk_accuracy is not None and m.dense_accuracy is not None else None,
        "cs": {
            "init": m.cs_init,
            "after_premin": m.cs_after_premin,
            "after_train": m.cs_after_train,
            "shrunk": m.cs_shrunk,
            "definition": "normalized Convolutional Similarity summed over conv layers (pairs=all, channels=same)",
        },
        "cs_beta": recipe.train.cs_beta,  # the CS regulariser's weight in dense training (0: off)
        "stages": dict(state.seconds),
        "total_seconds": round(sum(state.seconds.values()), 1),
        "exports": dict(state.exports),
        "onnx_max_abs_diff": m.onnx_max_abs_diff,
        "pt2_max_abs_diff": m.pt2_max_abs_diff,
        "int8": m.int8,
        "speed": m.speed,
        "target_latency": recipe.prune.target_latency,
        "ignored_layers": plan.get("ignored", []),
        "data_notes": list(getattr(data, "notes", None) or []),
        "notes": [n for n in (m.dtype_note, m.chance_note, m.prune_note, m.validation_note) if n],
        # prune.max_accuracy_drop: every size tried, the choice (on validation) and the fine-tunings it took
        "size_search": m.search,
        # processes of the (latest) start and the batch they shared: train.batch_size is the global batch
        "world_size": state.processes.get("world_size", 1),
        "global_batch": state.processes.get("global_batch", recipe.train.batch_size),
        "per_process_batch": state.processes.get("per_process_batch", recipe.train.batch_size),
    }


def _ignored_lines(report: dict) -> list[str]:
    """report.md's list of the layers left unpruned, with their reasons."""
    ignored = report.get("ignored_layers") or []
    if not ignored:
        return []
    return ["Layers left unpruned:", "", *[f"- `{e['layer']}` ({e['rule']}): {e['reason']}" for e in ignored], ""]


def speedup_text(speedup: float) -> str:
    """``1.38x faster``, or ``1.39x slower`` for a shrunk model that measured slower than the dense one."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _speed_lines(report: dict, short: bool = False) -> list[str]:
    """One line per measured batch size: dense vs shrunk latency (and the int8 ONNX model's top-1).
    ``short``: a timing warning as its spread only, pointing to report.md, which has it in full."""
    out = [
        f"Latency at batch {r['batch']} ({r['device']}, {r['precision']}, median): dense {r['dense_ms']:.2f} ms, "
        f"shrunk {r['shrunk_ms']:.2f} ms, " + speedup_text(r["speedup"])
        + (f" (timings spread {r['spread']:.0%}: the device looked busy; see report.md)" if short and r.get("warning") and r.get("spread") is not None
           else f" ({r['warning']})" if r.get("warning") else "")
        for r in report.get("speed") or []
    ]
    q = report.get("int8")
    if q:
        out.append(f"int8 ONNX (onnxruntime): top-1 {q['top1_int8']:.2f}% vs {q['top1_fp32']:.2f}% for the fp32 ONNX model "
                   f"({q['calibration_images']} calibration images)")
    return out


_STEP_NAMES = {"dense": "dense", "dropped": "channels dropped", "compensated": "compensated",
               "refitted": "refitted to the dense layers", "bn": "BN re-estimated"}


def _steps_lines(report: dict) -> list[str]:
    """report.md's line on how top-1 moved through the prune stage (and the compensation's summary)."""
    steps = report.get("prune_steps")
    if not steps:
        return []
    moved = " → ".join(f"{_STEP_NAMES.get(k, k)} {v:.2f}" for k, v in steps.items() if k != "split")
    lines = [f"Top-1 through pruning ({steps.get('split')} split): {moved}; after fine-tuning "
             f"{_fmt(report['shrunk']['accuracy'], '.2f')} (test).  "]
    if report.get("compensation"):
        lines.append(f"Compensation: {report['compensation']}.  ")
    return [*lines, ""]


def _search_lines(report: dict) -> list[str]:
    """report.md's section on the size search (``prune.max_accuracy_drop``): every candidate and the choice."""
    s = report.get("size_search")
    if not s:
        return []
    split = "images held out of training by the run" if s["split"] == "held out" else "the recipe's data.val_split"
    lines = [(
        f"Size search: the smallest {s['kind']} target whose validation top-1 after {s['search_epochs']} fine-tuning epoch(s) is "
        f"within {s['max_drop']:g} points of the dense model's ({s['dense_val_top1']:.2f} % on {s['val_images']} images, {split}); "
        f"chose **{_fmt(s['target'], 'g')}** after {len(s['candidates'])} candidates and {s['fine_tunings']} fine-tunings "
        f"(the winner's included).  "
    )]
    if s.get("winner_val_top1") is not None:
        drop = s["dense_val_top1"] - s["winner_val_top1"]
        lines.append(f"After its full fine-tuning: validation {s['winner_val_top1']:.2f} % (dense minus this: {drop:.2f} points, "
                     f"{'within' if drop <= s['max_drop'] else 'NOT within'} {s['max_drop']:g}), test {_fmt(s.get('winner_test_top1'), '.2f')} %.  ")
    if s.get("note"):
        lines.append(f"Note: {s['note']}  ")
    lines += ["", f"| {s['kind']} target | params ratio | MACs ratio | latency ratio | top-1 before ft | val top-1 | test top-1 | passed | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(s["candidates"], key=lambda c: c["target"]):
        lines.append(f"| {c['target']:g} | {_fmt(c['params_ratio'], '.3f')} | {_fmt(c['macs_ratio'], '.3f')} | {_fmt(c['latency_ratio'], '.3f')} | "
                     f"{_fmt(c['top1_before_finetune'], '.2f')} | {_fmt(c['val_top1'], '.2f')} | {_fmt(c['test_top1'], '.2f')} | "
                     f"{'yes' if c['passed'] else 'no' + (' (unreachable)' if c.get('note') else '')} | {c['seconds']:.0f} |")
    return [*lines, ""]


def _fmt(v, spec=",", none="–"):
    return none if v is None else format(v, spec)


def _finetune_text(report: dict) -> str:
    epochs = report.get("finetune_epochs")
    if epochs == 0:
        return "no fine-tuning"
    return (f"{epochs} fine-tuning epoch{'s' if epochs != 1 else ''}" if epochs is not None else "fine-tuning") + (
        f", distillation {report['distill']:g}" if report.get("distill") else ", no distillation")


def write_report(report: dict, state: RunState, run_dir: Path) -> None:
    """report.json, report.md and the plots into ``run_dir`` (each written atomically)."""
    run_dir = Path(run_dir)
    plots = _plots(state, run_dir)
    report = dict(report, plots=plots)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1))
    d, s = report["dense"], report["shrunk"]
    lines = [
        f"# convsim-shrink report: {report['model']}"
        + (f" (width {report['width']})" if report.get("width") is not None else "") + f" on {report['dataset']}",
        "",
        f"Criterion `{report['criterion']}` ({'global' if report.get('global_pruning') else 'per-layer'} pruning), "
        f"target {_target_text(report['target'])}, {_finetune_text(report)}. Accuracy is top-1 on "
        f"{report['test_images'] or 'the'} test images.",
        "",
        *([f"Model: {report['source']}.", ""] if report.get("source") else []),
        *([f"Dense row: {d['note']}.", ""] if d.get("note") else []),
        *[f"Note: {n}  " for n in (*report.get("data_notes", []), *report.get("notes", []))],
        "",
        *_steps_lines(report),
        *_search_lines(report),
        "| | params | MACs | accuracy % |",
        "|---|---|---|---|",
        f"| dense | {_fmt(d['params'])} | {_fmt(d['macs'])} | {_fmt(d['accuracy'], '.2f')} |",
        f"| pruned, before fine-tuning | {_fmt(s['params'])} | {_fmt(s['macs'])} | {_fmt(s['accuracy_before_finetune'], '.2f')} |",
        f"| **shrunk** | {_fmt(s['params'])} | {_fmt(s['macs'])} | **{_fmt(s['accuracy'], '.2f')}** |",
        f"| ratio / change | {_fmt(report['params_ratio'], '.4f')} | {_fmt(report['macs_ratio'], '.4f')} | {_fmt(report['accuracy_delta'], '+.2f')} |",
        "",
        "Convolutional Similarity (normalized, summed over conv layers): "
        + ", ".join(f"{k.replace('_', ' ')} {_fmt(v, '.4g')}" for k, v in report["cs"].items() if k != "definition"),
        "",
        *[line + "  " for line in _speed_lines(report)],
        "",
        *_ignored_lines(report),
        "Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages"].items()) + f" (total {report['total_seconds']})",
        "",
        f"Processes: {report.get('world_size', 1)}; global batch {report.get('global_batch')} "
        f"({report.get('per_process_batch')} per process).",
        "",
        "Exports: " + ", ".join(f"[{k}]({Path(v).name})" for k, v in report["exports"].items()),
        "",
    ]
    lines += [f"![{name}]({Path(p).name})" for name, p in plots.items()]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def _plots(state: RunState, run_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    layers = state.layers

    def save(fig, name):
        path = run_dir / name
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        out[name.removesuffix(".png")] = str(path)

    hist = [("train", h) for h in state.history_train] + [("finetune", h) for h in state.history_finetune]
    if hist:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        xs = list(range(1, len(hist) + 1))
        a1.plot(xs, [h["train_loss"] for _, h in hist], marker="o")
        a1.set_xlabel("epoch (train, then fine-tune)")
        a1.set_ylabel("training loss")
        a2.plot(xs, [h["train_acc"] for _, h in hist], marker="o", label="train (augmented)")
        if any("val_acc" in h for _, h in hist):
            a2.plot([x for x, (_, h) in zip(xs, hist) if "val_acc" in h], [h["val_acc"] for _, h in hist if "val_acc" in h], marker="s", label="validation")
        n_train = len(state.history_train)
        for ax in (a1, a2):
            ax.axvline(n_train + 0.5, color="grey", ls="--", lw=1)
        a2.set_ylabel("top-1 %")
        a2.legend()
        save(fig, "training_curves.png")
    before, after = layers.channels_dense, layers.channels_shrunk
    if before and after:
        names = [n for n in before if n in after]
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 3.8))
        idx = range(len(names))
        ax.bar([i - 0.2 for i in idx], [before[n] for n in names], 0.4, label="dense")
        ax.bar([i + 0.2 for i in idx], [after[n] for n in names], 0.4, label="shrunk")
        ax.set_xticks(list(idx), names, rotation=90, fontsize=7)
        ax.set_ylabel("output channels")
        ax.legend()
        save(fig, "channels_per_layer.png")
    series = [(k, getattr(layers, k)) for k in ("cs_init", "cs_after_premin", "cs_after_train", "cs_shrunk") if getattr(layers, k)]
    if series:
        names = list(series[0][1])
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 3.8))
        for label, values in series:
            ax.plot(range(len(names)), [max(values.get(n, float("nan")), 1e-12) for n in names], marker="o", ms=3, label=label.removeprefix("cs_").replace("_", " "))
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylabel("normalized CS")
        ax.legend()
        save(fig, "cs_per_layer.png")
    return out


def _cs_rise(report: dict) -> str:
    """Why CS went up in training, when it did: a reader expects a tool named after CS to lower it."""
    cs = report.get("cs") or {}
    before = cs.get("after_premin") if cs.get("after_premin") is not None else cs.get("init")
    after = cs.get("after_train")
    if before is None or after is None or after <= before:
        return ""
    why = "train.cs_beta is 0" if not report.get("cs_beta") else f"train.cs_beta {report['cs_beta']:g} held it only in part"
    return f" (training raised it: {why}; pruning then removes the most similar channels)"


def print_summary(report: dict) -> None:
    from rich.table import Table

    from ..console import console

    d, s = report["dense"], report["shrunk"]
    table = Table(title=f"{report['model']} on {report['dataset']} ({report['criterion']})")
    for col in ("", "params", "MACs", "top-1 %"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("dense", _fmt(d["params"]), _fmt(d["macs"]), _fmt(d["accuracy"], ".2f"))
    table.add_row("pruned (before fine-tune)", _fmt(s["params"]), _fmt(s["macs"]), _fmt(s["accuracy_before_finetune"], ".2f"))
    table.add_row("[bold]shrunk", _fmt(s["params"]), _fmt(s["macs"]), f"[bold]{_fmt(s['accuracy'], '.2f')}")
    table.add_row("ratio / change", _fmt(report["params_ratio"], ".4f"), _fmt(report["macs_ratio"], ".4f"), _fmt(report["accuracy_delta"], "+.2f"))
    console.print(table)
    if d.get("note"):
        console.print(f"dense row: {d['note']}", soft_wrap=True)
    # consecutive points with the same value (stages that did not run: a pretrained model skips
    # pre-minimisation and training) are named together: "init = after premin = after train 921.9"
    groups: list[tuple[list[str], object]] = []
    for k, v in report["cs"].items():
        if k == "definition":
            continue
        if groups and v is not None and groups[-1][1] == v:
            groups[-1][0].append(k.replace("_", " "))
        else:
            groups.append(([k.replace("_", " ")], v))
    rise = _cs_rise(report)
    cs = ", ".join(f"{' = '.join(names)} {_fmt(v, '.4g')}{rise if 'after train' in names else ''}" for names, v in groups)
    total = report["total_seconds"]
    minutes = f" ({total / 60:.1f} min)" if isinstance(total, (int, float)) and total >= 120 else ""
    console.print((f"CS (normalized): {cs}  |  " if cs else "") + f"{total} s{minutes} in all", soft_wrap=True)
    s = report.get("size_search")
    if s:
        console.print(f"size search: {s['kind']} {_fmt(s['target'], 'g')} chosen on validation from {len(s['candidates'])} candidates, "
                      f"{s['fine_tunings']} fine-tunings; validation {_fmt(s.get('winner_val_top1'), '.2f')} vs dense "
                      f"{s['dense_val_top1']:.2f} (max drop {s['max_drop']:g}); test {_fmt(s.get('winner_test_top1'), '.2f')}", soft_wrap=True)
    for line in _speed_lines(report, short=True):
        console.print(line, soft_wrap=True)
    if report.get("exports"):
        console.print("exports:")
    for name, path in report.get("exports", {}).items():
        console.print(f"  {name}: {path}")
