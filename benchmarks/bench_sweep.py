"""Issue 27's goals, measured through the command line: a sweep against the main job, side by side, and
``--max-drop`` on the main job.

    python benchmarks/bench_sweep.py --out bench-out/sweep                     # the goals (about 75 min on the 2-core CPU)
    python benchmarks/bench_sweep.py --out /tmp/tiny --model simple_cnn \\
        --set data.subset=600 --set data.test_subset=200 --set train.epochs=1   # a minute: does it run

Runs, one after the other in this process's session (so both see the same machine):

1. ``convsim-shrink MODEL --target-params 0.5``: the main job (README's command);
2. ``convsim-shrink sweep MODEL --targets 0.75,0.5,0.25,0.1 --finetune-epochs 1``: the 4-point sweep;
3. with ``--max-drop D``: ``convsim-shrink MODEL --max-drop D`` (goal 2: a model at most D points below
   dense on validation, its test top-1 beside, and the number of fine-tunings).

``--order sweep,main`` swaps 1 and 2 (run both orders on a shared machine: drift hits the later job).
Each job is a subprocess with ``--quiet``; its wall time is taken here. ``--set`` goes to every job.
Writes ``OUT/bench_sweep.json`` and prints a Markdown table: seconds of each job, the ratio sweep / main
(goal: at most 1.5), the sweep's points, and the size search's candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _job(name: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "convsim_shrink", *args]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"[{name}] failed (exit {done.returncode}); see {out / f'{name}.log'}:\n{(done.stdout + done.stderr)[-2000:]}")
    print(f"[{name}] {seconds:.0f} s", flush=True)
    return {"command": "convsim-shrink " + " ".join(args), "seconds": round(seconds, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="a new folder for the runs and the results")
    p.add_argument("--model", default="resnet18", help="MODEL of both commands (default: the main job's)")
    p.add_argument("--targets", default="0.75,0.5,0.25,0.1")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per sweep point")
    p.add_argument("--main-target", default="0.5", help="the main job's --target-params")
    p.add_argument("--max-drop", default=None, help="also run MODEL --max-drop D (goal 2)")
    p.add_argument("--order", default="main,sweep", choices=["main,sweep", "sweep,main"])
    p.add_argument("--skip-main", action="store_true", help="only the sweep (and the size search)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every job")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=False)
    sets = [a for s in args.set for a in ("--set", s)]
    jobs = {
        "main": [args.model, "--target-params", args.main_target, "--out", str(out / "main"), "--quiet", *sets],
        "sweep": ["sweep", args.model, "--targets", args.targets, "--finetune-epochs", str(args.finetune_epochs),
                  "--out", str(out / "sweep"), "--quiet", *sets],
    }
    order = [j for j in args.order.split(",") if not (args.skip_main and j == "main")]
    if args.max_drop is not None:
        jobs["max_drop"] = [args.model, "--max-drop", args.max_drop, "--out", str(out / "max_drop"), "--quiet", *sets]
        order.append("max_drop")
    import torch

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__},
        "order": order, "jobs": {},
    }
    for name in order:
        results["jobs"][name] = _job(name, jobs[name], out)
        json_path = out / name / ("sweep.json" if name == "sweep" else "report.json")
        results["jobs"][name]["result"] = json.loads(json_path.read_text())
    jobs_done = results["jobs"]
    if "main" in jobs_done and "sweep" in jobs_done:
        results["ratio_sweep_to_main"] = round(jobs_done["sweep"]["seconds"] / jobs_done["main"]["seconds"], 3)
    (out / "bench_sweep.json").write_text(json.dumps(results, indent=1))
    _print(results)
    return results


def _cell(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _print(results: dict) -> None:
    jobs = results["jobs"]
    print("\n| job | command | seconds |\n|---|---|---|")
    for name, j in jobs.items():
        print(f"| {name} | `{j['command']}` | {j['seconds']:.0f} |")
    if "ratio_sweep_to_main" in results:
        print(f"\nsweep / main: {results['ratio_sweep_to_main']:.2f} (goal: at most 1.5)")
    if "sweep" in jobs:
        s = jobs["sweep"]["result"]
        d = s["dense"]
        print(f"\nsweep ({s['kind']}, {s['finetune_epochs']} fine-tuning epoch(s) per point; dense {d['top1']:.2f} % test, "
              f"{d['latency_b1_ms']:.2f} / {d['latency_batch_ms']:.2f} ms at batch 1 / {s['latency_batch']}; dense stages {s['dense_seconds']:.0f} s)")
        print("\n| target | params | MACs | ms b1 | ms batch | top-1 before ft | top-1 | s |\n|---|---|---|---|---|---|---|---|")
        for pt in s["points"]:
            print(f"| {pt['target']:g} | {_cell(pt['params_ratio'], '.3f')} | {_cell(pt['macs_ratio'], '.3f')} | {_cell(pt['latency_b1_ms'], '.2f')} | "
                  f"{_cell(pt['latency_batch_ms'], '.2f')} | {_cell(pt['top1_before_finetune'], '.2f')} | {_cell(pt['top1'], '.2f')} | {pt['seconds']:.0f} |")
    if "main" in jobs:
        r = jobs["main"]["result"]
        print(f"\nmain job: params {r['params_ratio']:.3f}, top-1 {r['dense']['accuracy']:.2f} -> {r['shrunk']['accuracy']:.2f}, "
              f"{r['total_seconds']:.0f} s of stages")
    if "max_drop" in jobs:
        r = jobs["max_drop"]["result"]
        s = r["size_search"]
        drop = s["dense_val_top1"] - (s["winner_val_top1"] if s["winner_val_top1"] is not None else float("nan"))
        print(f"\n--max-drop {s['max_drop']:g}: {s['kind']} target {s['target']:g} (params {r['params_ratio']:.3f}); validation "
              f"{s['winner_val_top1']:.2f} vs dense {s['dense_val_top1']:.2f} ({drop:+.2f} below; {s['val_images']} images, {s['split']}); "
              f"test {s['winner_test_top1']:.2f} (dense {r['dense']['accuracy']:.2f}); {len(s['candidates'])} candidates, "
              f"{s['fine_tunings']} fine-tunings")
        print("\n| target | params | val top-1 | test top-1 | passed | s |\n|---|---|---|---|---|---|")
        for c in sorted(s["candidates"], key=lambda c: c["target"]):
            print(f"| {c['target']:g} | {_cell(c['params_ratio'], '.3f')} | {_cell(c['val_top1'], '.2f')} | {_cell(c['test_top1'], '.2f')} | "
                  f"{'yes' if c['passed'] else 'no'} | {c['seconds']:.0f} |")


if __name__ == "__main__":
    main()
