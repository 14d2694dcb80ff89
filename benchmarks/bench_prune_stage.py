"""The prune stage's time with and without compensation (and with the refit), side by side in one process.

    python benchmarks/bench_prune_stage.py bench-out/compare-main/dense-A-0.safetensors --preset main --repeats 3
    python benchmarks/bench_prune_stage.py bench-out/compare-main/dense-A-0.safetensors --preset main --refit 4 16

Runs ``stages.prune_stage`` on the dense model with the preset's recipe (compare.py's presets), alternating
``prune.compensate=false`` and ``true`` (A B A B ...; with ``--refit N ...`` also ``prune.compensation_refit=N``
for each N: A B C A B C ...), with ``prune.step_accuracy=false`` in all so that only the stage's own work is timed (the
per-step evaluations are a report option).  Prints each run's seconds (wall, and the process's CPU time,
steadier on a shared machine), the medians and their ratios to the plain stage, and the pruned models'
sizes (which must match).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.pipeline.stages import example_inputs_for, prepare_data, prune_stage
from convsim_shrink.recipe import default_recipe_for, resolve
from convsim_shrink.train import resolve_device
from convsim_shrink.train.device import cpu_has_fast_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PRESETS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", help="a dense model saved by compare.py (OUT/dense-A-SEED.safetensors)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="main")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--refit", type=int, nargs="*", default=[], metavar="BATCHES",
                   help="add prune.compensation_refit=BATCHES as a variant (each one given)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    recipe = resolve(default_recipe_for(preset["model"]), overrides={"run.seed": args.seed, "run.quiet": True},
                     sets=[*preset["sets"], "prune.step_accuracy=false", *args.set])
    device = resolve_device(recipe.run.device)
    print(f"{torch.get_num_threads()} threads, {device}, native bf16: {cpu_has_fast_bf16()}; torch {torch.__version__}")
    data = prepare_data(recipe)
    dense = convsim_shrink.load(args.dense).to(device)
    x = example_inputs_for(data.info)
    variants = {"plain": {"compensate": False}, "compensated": {"compensate": True}}
    for batches in args.refit:
        variants[f"refit{batches}"] = {"compensate": True, "compensation_refit": batches}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    sizes = {}
    for _ in range(args.repeats):
        for label, update in variants.items():
            cfg = recipe.prune.model_copy(update=update)
            torch.manual_seed(args.seed)
            t0, c0 = time.perf_counter(), time.process_time()
            out = prune_stage(dense, data, cfg, example_inputs=x, finetune=recipe.finetune, device=device)
            times[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
            sizes[label] = out.result.pruned.params
            print(f"{label}: {times[label][-1]:.1f} s ({cpu[label][-1]:.1f} s CPU), params {out.result.params_ratio:.4f}, "
                  f"top-1 {out.accuracy:.2f}", flush=True)
    base, base_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    for label in variants:
        a, c = statistics.median(times[label]), statistics.median(cpu[label])
        print(f"median {label}: {a:.1f} s ({c:.1f} s CPU), ratio to plain {a / base:.2f} ({c / base_cpu:.2f} CPU)")
    print(f"same size: {len(set(sizes.values())) == 1}")


if __name__ == "__main__":
    main()
