"""Architecture coverage: does every torchvision classification model shrink, or get refused with a
clear reason, and never crash?  (issue 12)

For each model of ``torchvision.models.list_models(module=torchvision.models)``: random weights, 10
classes, one small input (3x64x64 unless the table below says otherwise); the layers torch-pruning
must leave alone are planned (``pruneability.plan_ignored_layers``); task-loss gradients on two random
batches feed the shipped default criterion (convsim-taylor, global pruning, max layer ratio 0.9); then
``prune_to_target(target_params=0.5)`` through ``pruneability.prune_safely`` and one SGD step on the
pruned model, which must give a finite loss.  Each model runs in its own process under a time limit.

Status: ``shrunk`` (only the output layers kept whole), ``shrunk, N left alone`` (N more layers kept
whole, with the reasons), ``refused`` (a one-line ConvSimError before any training, with the reason),
``timeout``/``skipped``, ``out of memory`` (past the process's ``--memory-gb`` address-space cap, 16 GB by
default), or ``CRASH`` (any other exception: a bug).

    nice -n 10 python benchmarks/coverage.py --out bench-out/coverage            # every model
    python benchmarks/coverage.py --out bench-out/coverage --models resnet18 squeezenet1_1
    python benchmarks/coverage.py --out bench-out/coverage --table                # the table again

Results go to OUT/results.json (one entry per model, kept across runs: finished models are skipped).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

#: models that need another input size or constructor arguments at a small input
OVERRIDES: dict[str, dict] = {
    "inception_v3": {"size": 299},  # its auxiliary head (training mode) needs the 17x17 grid of a 299x299 input
    "maxvit_t": {"size": 224, "kwargs": {"input_size": (224, 224)}},  # partitions of 7 at every stage
    "vit_b_16": {"kwargs": {"image_size": 64}},
    "vit_b_32": {"kwargs": {"image_size": 64}},
    "vit_l_16": {"kwargs": {"image_size": 64}},
    "vit_l_32": {"kwargs": {"image_size": 64}},
    "vit_h_14": {"size": 56, "kwargs": {"image_size": 56}},
}


def run_one(name: str, *, size: int = 64, criterion: str = "convsim-taylor", target: float = 0.5,
            global_pruning: bool = True, threads: int = 1, seed: int = 0) -> dict:
    """Plan, prune and train one step of one torchvision model; the row of the table as a dict."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from convsim_shrink.errors import ConvSimError, OutOfMemoryError
    from convsim_shrink.models.adapt import logits_of
    from convsim_shrink.prune.pruning import measure
    from convsim_shrink.prune.ranking import get_criterion
    from convsim_shrink.prune.safety import plan_ignored_layers, prune_safely
    from convsim_shrink.prune.search import prune_to_target

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    override = OVERRIDES.get(name, {})
    size = override.get("size", size)
    row: dict = {"model": name, "input": f"3x{size}x{size}", "criterion": criterion, "target_params": target}
    t0 = time.perf_counter()
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **override.get("kwargs", {})).eval()
        x = torch.randn(1, 3, size, size)
        base = measure(model, x)
        row["params_m"] = round(base.params / 1e6, 2)
        t_plan = time.perf_counter()
        plan = plan_ignored_layers(model, x)
        row["plan_seconds"] = round(time.perf_counter() - t_plan, 1)
        row["trials"] = plan.trials
        with torch.no_grad():
            want_shape = tuple(model(x).shape)
        source, model = model, None  # one copy of the model in the benchmark: the 600 M-parameter ones fill memory
        if get_criterion(criterion).needs_gradients:  # task-loss gradients on two random batches
            source.train()
            g = torch.Generator().manual_seed(seed + 1)
            for _ in range(2):
                xb = torch.randn(4, 3, size, size, generator=g)
                yb = torch.randint(0, 10, (4,), generator=g)
                F.cross_entropy(logits_of(source(xb)), yb).backward()
            source.eval()
        prune = functools.partial(
            prune_to_target, source, x, get_criterion(criterion).create(), target_params=target,
            global_pruning=global_pruning, max_layer_ratio=0.9, tolerance=0.01, warn=False,
        )
        result, plan = prune_safely(source, x, prune, plan=plan.for_model(source))
        pruned = result.model
        row["params_ratio"] = round(result.params_ratio, 4)
        row["macs_ratio"] = round(result.macs_ratio, 4)
        if result.note:  # why the size is outside the target's window, when it is
            row["note"] = result.note
        with torch.no_grad():
            row["output_matches"] = tuple(pruned.eval()(x).shape) == want_shape
        # one training step: the pruned model must train (a finite loss, finite weights after the step)
        pruned.train()
        opt = torch.optim.SGD(pruned.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(seed + 2)
        xb, yb = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(logits_of(pruned(xb)), yb)
        loss.backward()
        opt.step()
        row["trains"] = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p).all()) for p in pruned.parameters())
        alone = plan.left_alone()
        row["left_alone"] = [f"{e.name}: {e.reason}" for e in alone]
        row["status"] = "shrunk" if not alone else f"shrunk, {len(alone)} left alone"
        if not row["output_matches"] or not row["trains"]:
            row["status"] = "CRASH: " + ("output shape changed" if not row["output_matches"] else "does not train")
    except OutOfMemoryError as exc:  # the process's cap (--memory-gb), said in one line by the tool
        row["status"] = "out of memory"
        row["reason"] = str(exc)
    except ConvSimError as exc:
        row["status"] = "refused"
        row["reason"] = str(exc)
    except MemoryError as exc:  # the process's cap (--memory-gb), not a bug of the tool
        row["status"] = "out of memory"
        row["reason"] = f"MemoryError under the benchmark's address-space cap {str(exc)[:100]}"
    except Exception as exc:  # a bug: keep where it happened
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        row["status"] = "CRASH"
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            row["status"] = "out of memory"
        row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _cap_memory(gb: float) -> None:
    """In the child process: cap its address space (ulimit -v), so that one model cannot take the machine."""
    import resource

    cap = int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _param_count(name: str) -> int:
    """Parameters of the model with 10 classes, counted on the meta device where the builder allows."""
    import torch
    import torchvision

    kwargs = {"weights": None, "num_classes": 10, **OVERRIDES.get(name, {}).get("kwargs", {})}
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, **kwargs)
    except NotImplementedError:  # builders that compute widths with tensors (RegNet): build for real
        model = torchvision.models.get_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def table(results: dict[str, dict]) -> str:
    lines = [
        "| model | params (M) | input | status | params ratio | MACs ratio | output shape | trains | seconds | notes |",
        "|---|---:|---|---|---:|---:|---|---|---:|---|",
    ]
    for name in sorted(results):
        r = results[name]
        notes = r.get("reason", "")
        if r.get("left_alone"):
            notes = "; ".join(r["left_alone"][:2]) + (f"; +{len(r['left_alone']) - 2} more" if len(r["left_alone"]) > 2 else "")
        if r.get("note"):
            notes = f"NOTE: {r['note']}; {notes}" if notes else f"NOTE: {r['note']}"
        ratio = f"{r['params_ratio']:.3f}" if "params_ratio" in r else ""
        macs = f"{r['macs_ratio']:.3f}" if "macs_ratio" in r else ""
        out = {True: "same", False: "CHANGED"}.get(r.get("output_matches"), "")
        trains = {True: "yes", False: "NO"}.get(r.get("trains"), "")
        lines.append(
            f"| {name} | {r.get('params_m', '')} | {r.get('input', '')} | {r['status']} | {ratio} | {macs} | {out} | "
            f"{trains} | {r.get('seconds', '')} | {notes.replace('|', '/')[:300]} |"
        )
    counts: dict[str, int] = {}
    for r in results.values():
        key = r["status"].split(",")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("")
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="*", help="default: every torchvision classification model")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--criterion", default="convsim-taylor")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--local", action="store_true", help="local instead of global pruning")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model")
    p.add_argument("--max-params", type=float, default=150, help="skip models with more parameters (millions)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-gb", type=float, default=16, help="address-space cap of each model's process (ulimit -v)")
    p.add_argument("--table", action="store_true", help="print the table of OUT/results.json and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its row as JSON
    args = p.parse_args(argv)

    if args.one:
        row = run_one(args.one, size=args.size, criterion=args.criterion, target=args.target,
                      global_pruning=not args.local, threads=args.threads)
        print(json.dumps(row))
        return
    results_file = args.out / "results.json"
    results: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        print(table(results))
        return
    names = args.models or classification_models()
    sizes = {n: _param_count(n) for n in names}
    for name in sorted(names, key=sizes.__getitem__):  # small models first: partial runs are useful
        if name in results:
            continue
        if sizes[name] > args.max_params * 1e6:
            results[name] = {"model": name, "params_m": round(sizes[name] / 1e6, 1), "status": "skipped",
                             "reason": f"more than {args.max_params:g} M parameters (this machine's memory and time limit)"}
        else:
            cmd = [sys.executable, __file__, "--out", str(args.out), "--one", name, "--size", str(args.size),
                   "--criterion", args.criterion, "--target", str(args.target), "--threads", str(args.threads)]
            if args.local:
                cmd.append("--local")
            t0 = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      preexec_fn=functools.partial(_cap_memory, args.memory_gb))
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                if lines:
                    results[name] = json.loads(lines[-1])
                else:
                    results[name] = {"model": name, "status": "CRASH", "reason": (done.stderr.strip().splitlines() or ["no output"])[-1][:300],
                                     "seconds": round(time.perf_counter() - t0, 1)}
            except subprocess.TimeoutExpired:
                results[name] = {"model": name, "params_m": round(sizes[name] / 1e6, 2), "status": "timeout",
                                 "reason": f"not finished in {args.timeout:g} s", "seconds": args.timeout}
        print(f"{name}: {results[name]['status']} {results[name].get('params_ratio', '')} ({results[name].get('seconds', '')} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_file)
    print(table(results))


if __name__ == "__main__":
    main()
