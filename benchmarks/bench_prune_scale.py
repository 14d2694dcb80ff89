"""The prune stage on large torchvision models at 224 px, where its time goes, and Torch-Pruning's own way
to a measured size beside it (issue 26, item 3).

    python benchmarks/bench_prune_scale.py --out bench-out/prune-scale                 # the five models
    python benchmarks/bench_prune_scale.py --out bench-out/prune-scale --models resnet50 --no-index-cache
    python benchmarks/bench_prune_scale.py --out bench-out/prune-scale --table

For each model (random weights, 1000 classes, 3x224x224), in its own process under a time limit:

* **ours**: the product's prune stage (``stages.prune_stage``) with the shipped defaults (``convsim-taylor``,
  global pruning, ``round_to`` 8, compensation on, target 0.5 of the parameters) on random 224 px images at
  ``--batch`` images a batch (calibration 4 batches, compensation statistics 16, BN re-estimation 50);
  ``prune.step_accuracy`` off.  Its parts are timed by wrapping the functions the stage calls: the plan
  of layers to leave alone, gradient calibration, input statistics, the target search (candidates
  pruned, measured, verified), the compensated re-pruning of the winner, BN re-estimation, the final
  evaluation (``--test-batches`` batches).
* **torch-pruning**: the way Torch-Pruning's benchmarks reach a measured size (``benchmarks/main.py``,
  ``progressive_pruning``): one ``MetaPruner`` with ``pruning_ratio=1`` over ``--tp-steps`` small steps,
  global pruning, group L2 magnitude, ``round_to`` 8, the classifier ignored; after every step the
  parameters are counted again (``count_ops_and_params``), until they are at most the target.  No data.

``--no-index-cache`` runs ours without :mod:`convsim_shrink.prune.index_cache` (torch-pruning's index
mapping recomputed for every group, as before).  Results go to OUT/results.json, one entry per
(model, variant), kept across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODELS = ["resnet50", "densenet121", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large"]


def _timed(parts: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def run_ours(name: str, size: int, batch: int, target: float, test_batches: int, index_cache: bool) -> dict:
    import torch
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    from convsim_shrink.data.loaders import DataBundle
    from convsim_shrink.data.presets import DataInfo
    from convsim_shrink.pipeline import stages
    from convsim_shrink.prune import search
    from convsim_shrink.prune.safety import limits
    from convsim_shrink.recipe import PruneConfig

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    g = torch.Generator().manual_seed(1)
    n = batch * 50
    images, labels = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)
    train = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)
    test = DataLoader(TensorDataset(images[: batch * test_batches], labels[: batch * test_batches]), batch_size=batch)
    info = DataInfo("random", 1000, 3, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), pad=0)
    data = DataBundle(info, train, None, test)
    cfg = PruneConfig(target_params=target, step_accuracy=False)
    parts: dict[str, float] = {}
    # wrap what the stage calls (names as the stage and the search module imported them)
    stages.plan_ignored_layers = _timed(parts, "plan", stages.plan_ignored_layers)
    stages.accumulate_gradients = _timed(parts, "calibration", stages.accumulate_gradients)
    stages.collect_input_statistics = _timed(parts, "statistics", stages.collect_input_statistics)
    stages.recalibrate_bn = _timed(parts, "bn", stages.recalibrate_bn)
    stages.evaluate = _timed(parts, "evaluate", stages.evaluate)
    plain_copy = search.prune_copy

    def prune_copy(*args, compensator=None, **kwargs):
        key = "search: prune candidates" if compensator is None else "compensated winner"
        return _timed(parts, key, plain_copy)(*args, compensator=compensator, **kwargs)

    search.prune_copy = prune_copy
    search.measure = _timed(parts, "search: measure candidates", search.measure)
    if not index_cache:
        limits.cached_index_mapping = contextlib.nullcontext
    t0 = time.perf_counter()
    out = stages.prune_stage(model, data, cfg, example_inputs=stages.example_inputs_for(info))
    total = time.perf_counter() - t0
    accounted = sum(parts.values())
    parts["other"] = total - accounted
    return {"seconds": round(total, 1), "parts": {k: round(v, 1) for k, v in parts.items()},
            "params_ratio": round(out.result.params_ratio, 4), "macs_ratio": round(out.result.macs_ratio, 4),
            "trials": out.result.trials, "params_m": round(out.result.base.params / 1e6, 2)}


def run_torch_pruning(name: str, size: int, target: float, steps: int, limit: float) -> dict:
    import torch
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    x = torch.randn(1, 3, size, size)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    t0 = time.perf_counter()
    _, base = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=1.0,
                                  iterative_steps=steps, global_pruning=True, max_pruning_ratio=0.9, round_to=8,
                                  ignored_layers=head)
    ratio, done = 1.0, 0
    while ratio > target and done < steps and time.perf_counter() - t0 < limit:
        pruner.step()
        done += 1
        macs, params = tp.utils.count_ops_and_params(model, x)
        ratio = params / base
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": done, "params_ratio": round(ratio, 4),
            "finished": ratio <= target, "params_m": round(base / 1e6, 2)}


def table(results: dict) -> str:
    models = sorted({r["model"] for r in results.values()}, key=lambda m: results.get(f"{m}/ours", {}).get("params_m", 0))
    keys = ["plan", "calibration", "statistics", "search: prune candidates", "search: measure candidates",
            "compensated winner", "bn", "evaluate", "other"]
    lines = ["| model | params (M) | ours: total s | " + " | ".join(keys) + " | params ratio | candidates | "
             "ours without the index cache: s | torch-pruning's loop: s (steps, params ratio) |",
             "|---|---:|---:|" + "---:|" * len(keys) + "---:|---:|---:|---|"]
    for m in models:
        o, nc, t = results.get(f"{m}/ours", {}), results.get(f"{m}/ours-nocache", {}), results.get(f"{m}/torch-pruning", {})
        cells = [str(o.get("parts", {}).get(k, "")) for k in keys]
        tp_cell = (f"{t['seconds']} ({t['steps']}, {t['params_ratio']:.3f}{'' if t.get('finished') else ', not finished'})"
                   if "seconds" in t else t.get("status", ""))
        lines.append(f"| {m} | {o.get('params_m', '')} | {o.get('seconds', o.get('status', ''))} | " + " | ".join(cells)
                     + f" | {o.get('params_ratio', '')} | {o.get('trials', '')} | {nc.get('seconds', nc.get('status', ''))} | {tp_cell} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--test-batches", type=int, default=4)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--tp-steps", type=int, default=400)
    p.add_argument("--variants", nargs="*", default=["ours", "torch-pruning"], choices=["ours", "ours-nocache", "torch-pruning"])
    p.add_argument("--no-index-cache", action="store_true", help="same as --variants ours-nocache")
    p.add_argument("--table", action="store_true")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL VARIANT
    args = p.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        name, variant = args.one
        if variant == "torch-pruning":
            row = run_torch_pruning(name, args.size, args.target, args.tp_steps, args.timeout - 30)
        else:
            row = run_ours(name, args.size, args.batch, args.target, args.test_batches, variant == "ours")
        print(json.dumps({"model": name, "variant": variant, **row}))
        return
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        print(table(results))
        return
    import torch

    print(f"{args.threads} threads, torch {torch.__version__}, batch {args.batch} at {args.size} px", flush=True)
    variants = ["ours-nocache"] if args.no_index_cache else args.variants
    for name in args.models:
        for variant in variants:
            key = f"{name}/{variant}"
            if key in results:
                continue
            cmd = [sys.executable, __file__, "--out", str(args.out), "--one", name, variant, "--size", str(args.size),
                   "--batch", str(args.batch), "--test-batches", str(args.test_batches), "--target", str(args.target),
                   "--threads", str(args.threads), "--timeout", str(args.timeout), "--tp-steps", str(args.tp_steps)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                rows = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                results[key] = json.loads(rows[-1]) if rows else {
                    "model": name, "variant": variant, "status": "error: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            except subprocess.TimeoutExpired:
                results[key] = {"model": name, "variant": variant, "status": f"not finished in {args.timeout:g} s"}
            print(key, json.dumps(results[key]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            tmp = results_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(results_file)
    print(table(results))


if __name__ == "__main__":
    main()
