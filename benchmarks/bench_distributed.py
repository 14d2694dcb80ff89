"""Distributed training speed, side by side in one run: the same work (same model, data, global batch,
epochs) without torchrun, under torchrun with one process, and under torchrun with N processes.

    python benchmarks/bench_distributed.py                       # CPU: plain (2 and 1 threads), --nproc 1, --nproc 2
    python benchmarks/bench_distributed.py --device cuda --starts 0 1 --model resnet18 --recipe resnet18-full \\
        --width 1.0 --subset 0 --test-subset 0 --epochs 2      # GPU: overhead of the distributed path

Every row is the command line a user types (``convsim-shrink MODEL ... [--nproc N]``, run as a
subprocess), so the numbers are the product's.  Each run does the full pipeline, kept short (no
pre-minimisation, an L1 prune without fine-tuning); the table reports the dense training stage:
training images/s (all processes together, from the run's history) and the train stage's wall time
(epochs + the per-epoch test evaluation), plus the whole command's wall time (process start, data,
pruning and writing included).

``--starts`` lists the rows as ``N`` or ``N:T``: ``N`` processes under torchrun (``--nproc N``; 0 =
without torchrun), ``T`` threads per process (``OMP_NUM_THREADS``; default: torch's own choice without
torchrun, cores / N with ``--nproc``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(start: str, args, out: Path) -> dict:
    nproc, _, threads = start.partition(":")
    nproc = int(nproc)
    sets = [
        f"model.width={args.width}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
        "premin.steps=0", "finetune.epochs=0", "prune.bn_recalibration=0", "export.formats=[convsim]",
        "prune.latency_batch=1", f"data.test_subset={args.test_subset}",
    ]
    if args.subset:
        sets.append(f"data.subset={args.subset}")
    if not args.test_subset:
        sets.remove(f"data.test_subset={args.test_subset}")
    cmd = [sys.executable, "-m", "convsim_shrink", args.model, "--target-params", "0.5", "--criterion", "l1", "--device", args.device,
           "--out", str(out), "-q", *[a for s in sets for a in ("--set", s)]]
    if args.recipe:
        cmd += ["--recipe", args.recipe]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "state.json").read_text())
    hist = state["history_train"]
    ips = sum(h["images_per_s"] for h in hist) / len(hist)
    shown = threads or (f"{max(1, (os.cpu_count() or 1) // nproc)} (cores / N)" if nproc else f"torch default ({os.cpu_count()})")
    return {"nproc": nproc, "threads": shown, "images_per_s": ips, "train_s": report["stages"]["train"], "command_s": wall,
            "world_size": report["world_size"], "per_process_batch": report["per_process_batch"],
            "accuracy": report["dense"]["accuracy"], "command": (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join(cmd[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--recipe", default=None)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--subset", type=int, default=1024, help="training images (0 = all)")
    p.add_argument("--test-subset", type=int, default=300, help="test images (0 = all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of the data set (default: where the recipe's data set is found)")
    p.add_argument("--starts", nargs="+", default=["0", "0:1", "1", "2"], help="N or N:T (see the module docstring)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, start in enumerate(args.starts):
            rows.append(run_once(start, args, Path(tmp) / f"run{i}"))
    base = rows[0]
    print(f"# {datetime.date.today()} on {platform.node()} ({os.cpu_count()} CPUs visible), device {args.device}, "
          f"{args.model} width {args.width}, {args.subset or 'all'} training images, global batch {args.batch}, {args.epochs} epoch(s)")
    print("| start | processes | threads per process | batch per process | train images/s | train stage s | command s | dense top-1 % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        start = "without torchrun" if r["nproc"] == 0 else f"--nproc {r['nproc']} (torchrun)"
        print(f"| {start} | {r['world_size']} | {r['threads']} | {r['per_process_batch']} | {r['images_per_s']:.0f} "
              f"({r['images_per_s'] / base['images_per_s']:.2f}x) | {r['train_s']:.1f} | {r['command_s']:.1f} | {r['accuracy']:.2f} |")
    print()
    for r in rows:
        print(f"    {r['command']}")


if __name__ == "__main__":
    main()
