"""Real inference speed-up of a shrunk model against its dense model, side by side in one run.

    python benchmarks/bench_inference.py RUN_DIR            # dense.safetensors vs model.safetensors of a run
    python benchmarks/bench_inference.py --model resnet18 --width 0.25 --target-params 0.5   # prune on the fly

CPU, fp32 eval, batch 1 and 64, median of repeated runs (dense and shrunk alternate, so drift hits both).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.models import create_model
from convsim_shrink.prune.pruning import measure
from convsim_shrink.prune.ranking import make_importance
from convsim_shrink.prune.search import prune_to_target


def median_latency(models, x, repeats):
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--target-params", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    args = p.parse_args()
    if args.run_dir:
        run = Path(args.run_dir)
        dense, shrunk = convsim_shrink.load(run / "dense.safetensors"), convsim_shrink.load(run / "model.safetensors")
        source = f"run {run.name}"
    else:
        torch.manual_seed(0)
        dense = create_model(args.model, in_channels=args.channels, width=args.width).eval()
        x = torch.randn(1, args.channels, args.size, args.size)
        shrunk = prune_to_target(dense, x, make_importance("convsim"), target_params=args.target_params).model.eval()
        source = f"{args.model} width {args.width}, pruned on the fly to {args.target_params}"
    x1 = torch.randn(1, args.channels, args.size, args.size)
    d, s = measure(dense, x1), measure(shrunk, x1)
    print(f"{source}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32\n")
    print(f"params {d.params:,} → {s.params:,} ({s.params / d.params:.3f}); MACs {d.macs:,} → {s.macs:,} ({s.macs / d.macs:.3f})\n")
    print("| batch | dense ms | shrunk ms | speed-up |\n|---|---|---|---|")
    for batch in (1, 64):
        x = torch.randn(batch, args.channels, args.size, args.size)
        t = median_latency({"dense": dense, "shrunk": shrunk}, x, args.repeats)
        print(f"| {batch} | {1000 * t['dense']:.2f} | {1000 * t['shrunk']:.2f} | {t['dense'] / t['shrunk']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
