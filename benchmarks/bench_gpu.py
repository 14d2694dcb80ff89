"""Issue 26, item 5: the main job on a GPU, once in one process and once under ``--nproc`` (torchrun, NCCL),
with the training speed and the shrunk model's GPU latency at batch 1 and 256 beside the dense one.

Prepared for a lent GPU machine (15 minutes of device time in all), to run once:

    python benchmarks/bench_gpu.py --out bench-out/gpu                      # on the GPU machine
    python benchmarks/bench_gpu.py --out /tmp/gpu-smoke --device cpu --smoke  # the same flow on a CPU, in a minute

Each row is the command a user types (``convsim-shrink resnet18 --target-params 0.5`` with ``--device`` and
``--set prune.latency_batch=256``; the second row adds ``--nproc N``, N = the GPUs present, NCCL on CUDA),
run as a subprocess with a time limit, one after the other.  ``--smoke`` shrinks the data and the epochs
(a check of the flow, not a measurement).  The table comes from each run's ``state.json``: images/s of
every training and fine-tuning epoch (all processes together), the stages' seconds, and the speed rows the
run measured (dense and shrunk, median milliseconds per batch).  Everything is also written to
``OUT/results.json``; a run that fails or passes its limit is a row with its status and the log's tail.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convsim_shrink.io import atomic_write_text

SMOKE_SETS = ["data.subset=512", "data.test_subset=256", "train.epochs=1", "finetune.epochs=1", "premin.steps=2",
              "export.formats=[convsim]"]


def environment(device: str) -> dict:
    import torch

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    return env


def run_one(name: str, out: Path, device: str, nproc: int | None, smoke: bool, timeout: float) -> dict:
    """One command line, as a user types it; its row."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "convsim_shrink", "resnet18", "--target-params", "0.5", "--device", device, "--out", str(run_dir),
           "--set", "prune.latency_batch=256", "--quiet"]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    for s in SMOKE_SETS if smoke else []:
        cmd += ["--set", s]
    log = out / f"{name}.log"
    row: dict = {"name": name, "command": " ".join(cmd[2:]), "nproc": nproc or 0}
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        row["status"] = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        row["status"] = f"timeout ({timeout:g} s)"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    state_file = run_dir / "state.json"
    if row["status"] != "ok" or not state_file.is_file():
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        return row
    state = json.loads(state_file.read_text())
    for stage in ("train", "finetune"):
        speeds = [h["images_per_s"] for h in state.get(f"history_{stage}", []) if h.get("images_per_s")]
        row[f"{stage}_img_s"] = round(statistics.median(speeds), 1) if speeds else None
    row["stages"] = {k: round(v, 1) for k, v in state.get("seconds", {}).items()}
    m = state.get("metrics", {})
    row["dense_top1"], row["shrunk_top1"] = m.get("dense_accuracy"), m.get("shrunk_accuracy")
    row["speed"] = [{k: r.get(k) for k in ("batch", "dense_ms", "shrunk_ms", "speedup", "spread", "precision")} for r in m.get("speed") or []]
    row["processes"] = state.get("processes")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| run | status | seconds | train img/s | fine-tune img/s | top-1 dense → shrunk | latency b1 dense / shrunk ms | latency b256 dense / shrunk ms |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        speed = {s["batch"]: s for s in r.get("speed") or []}

        def lat(b, speed=speed):
            s = speed.get(b)
            return f"{s['dense_ms']:.2f} / {s['shrunk_ms']:.2f} ({s['speedup']:.2f}x)" if s else ""

        top1 = f"{r['dense_top1']:.2f} → {r['shrunk_top1']:.2f}" if r.get("shrunk_top1") is not None else ""
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r.get('train_img_s') or ''} | {r.get('finetune_img_s') or ''} "
                     f"| {top1} | {lat(1)} | {lat(256)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--nproc", type=int, default=None, help="processes of the second row (default: the GPUs present; 1 on a CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny data and one epoch each: the flow, not a measurement")
    p.add_argument("--timeout", type=float, default=270, help="seconds per run (two runs fit a 10-minute call)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    nproc = args.nproc or max(1, len(env.get("gpus", [])) or 1)
    print(json.dumps(env), flush=True)
    rows = []
    for name, n in (("one-process", None), (f"nproc-{nproc}", nproc)):
        rows.append(run_one(name, args.out, args.device, n, args.smoke, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
        atomic_write_text(args.out / "results.json", json.dumps({"environment": env, "rows": rows}, indent=1))
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
