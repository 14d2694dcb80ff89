"""What the shrunk model runs as, side by side in one run: torch latency of the dense and shrunk models,
and int8 ONNX against fp32 ONNX under onnxruntime (throughput and top-1).

    python benchmarks/bench_deploy.py RUN_DIR                      # dense.safetensors vs model.safetensors of a run
    python benchmarks/bench_deploy.py DENSE.safetensors SHRUNK.safetensors [--data-dir DIR]

Measured with the library's own functions (convsim_shrink.measure.latency, convsim_shrink.export), as a run's report would:
* torch, fp32, contiguous, eval: dense vs shrunk at each ``--batches`` size, taking turns (``rounds``)
  so drift on a shared machine hits both; median of ``--repeats`` timed passes, spread = IQR / median;
* ONNX (opset 17, dynamic batch) of both models, and the int8 ONNX of both (static quantization,
  QDQ, per-channel weights, ``--calibration`` unaugmented training images): onnxruntime CPU provider,
  batch ``--onnx-batch``, the four sessions taking turns; top-1 of every model on the test set.

The data set comes from the models' recipe (``data.name``); ``--test-subset`` evaluates on a
class-balanced slice. Threads: torch's and onnxruntime's both follow ``--threads`` (default: torch's).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.data import build_data
from convsim_shrink.export import onnx as onnx_export
from convsim_shrink.export import onnx_int8
from convsim_shrink.export.native import read_metadata
from convsim_shrink.export.onnx import export_onnx
from convsim_shrink.measure import latency
from convsim_shrink.prune.pruning import measure
from convsim_shrink.recipe import DataConfig
from convsim_shrink.train import evaluate


def _models(paths: list[str]) -> tuple[Path, Path]:
    if len(paths) == 1:
        run = Path(paths[0])
        return run / "dense.safetensors", run / "model.safetensors"
    if len(paths) == 2:
        return Path(paths[0]), Path(paths[1])
    sys.exit("give a run directory, or the dense and the shrunk model files")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="RUN_DIR, or DENSE.safetensors SHRUNK.safetensors")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--onnx-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calibration", type=int, default=300, help="training images that calibrate int8")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--search-latency", type=float, default=None, metavar="R",
                   help="also time the pruning search: prune the dense model to latency R (global, round_to 8, "
                        "lamp scores) at batch --search-batch and report its trials and measurement cost")
    p.add_argument("--search-batch", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_path, shrunk_path = _models(args.paths)
    dense, shrunk = convsim_shrink.load(dense_path).eval(), convsim_shrink.load(shrunk_path).eval()
    recipe = read_metadata(shrunk_path)["recipe"]
    data_name = (recipe.get("data") or {}).get("name", "fashion-mnist")
    data = build_data(DataConfig(name=data_name, dir=args.data_dir, test_subset=args.test_subset), batch_size=128)
    info = data.info
    shape = (info.in_channels, info.image_size, info.image_size)
    x1 = torch.randn(1, *shape)
    d, s = measure(dense, x1), measure(shrunk, x1)
    out: dict = {
        "dense": str(dense_path), "shrunk": str(shrunk_path), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "params": [d.params, s.params], "macs": [d.macs, s.macs],
    }
    print(f"{dense_path} vs {shrunk_path}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"params {d.params:,} → {s.params:,} ({s.params / d.params:.3f}); MACs {d.macs:,} → {s.macs:,} ({s.macs / d.macs:.3f})\n")

    t0 = time.perf_counter()
    rows = latency.speed_rows(dense, shrunk, shape, args.batches, repeats=args.repeats, rounds=args.rounds)
    out["torch_latency"] = rows
    print("torch, fp32, eval (dense and shrunk taking turns; median; spread = IQR / median)\n")
    print("| batch | dense ms | shrunk ms | speed-up | spread |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['dense_ms']:.2f} | {r['shrunk_ms']:.2f} | {r['speedup']:.2f}× | {100 * r['spread']:.0f}% |")
    print()
    for r in rows:
        if r["warning"]:
            print(f"warning: {r['warning']}")
    print(f"({time.perf_counter() - t0:.1f} s)\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        tmp = Path(tmp)
        onnx_paths, top1 = {}, {}
        calibration = onnx_int8.calibration_view(data.train)
        for name, model in (("dense", dense), ("shrunk", shrunk)):
            fp32 = export_onnx(model, tmp / f"{name}.onnx", x1)
            t0 = time.perf_counter()
            int8 = onnx_int8.quantize_onnx_int8(fp32, tmp / f"{name}.int8.onnx", calibration, images=args.calibration)
            out[f"{name}_quantize_seconds"] = time.perf_counter() - t0
            onnx_paths[f"{name} fp32"], onnx_paths[f"{name} int8"] = fp32, int8
            top1[f"{name} torch"] = evaluate(model, data.test)["acc"]
        for key, path in onnx_paths.items():
            top1[key] = onnx_export.evaluate_onnx(path, data.test)
        lat = latency.compare_onnx_latency(onnx_paths, shape, args.onnx_batch, repeats=args.repeats, rounds=args.rounds)
    base = lat["dense fp32"].seconds
    out["onnx"] = {k: {**v.to_dict(), "throughput_vs_dense_fp32": base / v.seconds, "top1": top1[k]} for k, v in lat.items()}
    out["top1_torch"] = {"dense": top1["dense torch"], "shrunk": top1["shrunk torch"]}
    n_test = data.test.num_samples if hasattr(data.test, "num_samples") else "?"
    print(f"onnxruntime CPU, batch {args.onnx_batch}, the four models taking turns; top-1 on {n_test} test images "
          f"(torch: dense {top1['dense torch']:.2f}%, shrunk {top1['shrunk torch']:.2f}%)\n")
    print("| model | ms / batch | images/s | vs dense fp32 | spread | top-1 % |\n|---|---|---|---|---|---|")
    for k, v in lat.items():
        print(f"| {k} | {v.ms:.2f} | {v.images_per_second:,.0f} | {base / v.seconds:.2f}× | {100 * v.spread:.0f}% | {top1[k]:.2f} |")
    print()
    noisier = max(lat.values(), key=lambda v: v.spread)
    if noisier.spread_warning():
        print(f"warning: {noisier.spread_warning()}")
    print(f"int8 vs fp32, shrunk: top-1 {top1['shrunk int8'] - top1['shrunk fp32']:+.2f} points; "
          f"shrunk int8 vs dense fp32: {base / lat['shrunk int8'].seconds:.2f}× the throughput")
    if args.search_latency:
        out["search"] = search_cost(dense, shape, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def search_cost(dense, shape, args) -> dict:
    """prune_to_target(target_latency=R) on the dense model with the library's timer: trials, timings, result."""
    from convsim_shrink.prune.ranking import make_importance
    from convsim_shrink.prune.search import prune_to_target

    meter = latency.latency_meter(shape, args.search_batch)
    t0 = time.perf_counter()
    r = prune_to_target(dense, torch.randn(1, *shape), make_importance("lamp"), target_latency=args.search_latency,
                        latency_fn=meter, global_pruning=True, round_to=8, warn=False)
    wall = time.perf_counter() - t0
    row = latency.speed_rows(dense, r.model, shape, [args.search_batch], repeats=args.repeats, rounds=args.rounds)[0]
    print(f"\npruning search to latency {args.search_latency} at batch {args.search_batch} (lamp, global, round_to 8): "
          f"{r.trials} trials, {r.latency_measurements} latency measurements, {r.latency_seconds:.1f} s of {wall:.1f} s "
          f"measuring ({r.latency_seconds / r.latency_measurements:.2f} s each); found latency {r.latency_ratio:.3f}, "
          f"params {r.params_ratio:.3f}, MACs {r.macs_ratio:.3f}; re-measured side by side: {1 / row['speedup']:.3f} "
          f"({row['speedup']:.2f}× faster, spread {100 * row['spread']:.0f}%)")
    if r.note:
        print(f"note: {r.note}")
    return {
        "target": args.search_latency, "batch": args.search_batch, "trials": r.trials, "measurements": r.latency_measurements,
        "measure_seconds": r.latency_seconds, "wall_seconds": wall, "latency_ratio": r.latency_ratio,
        "params_ratio": r.params_ratio, "macs_ratio": r.macs_ratio, "remeasured": row, "note": r.note,
    }


if __name__ == "__main__":
    main()
