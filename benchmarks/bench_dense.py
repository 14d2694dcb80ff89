"""The paper's claim on real data, and what the CS stages do to dense accuracy.

1. Feature-map redundancy (mean |cosine| between channels' feature maps, averaged over conv layers)
   of one model on real test images at default (Kaiming) init, after orthogonal init
   (torch.nn.init.orthogonal_ on every conv), and after CS pre-minimisation.
2. Dense test accuracy after the same training budget: plain, with pre-minimisation, with the CS
   regulariser, and with both, for several seeds.

    python benchmarks/bench_dense.py --model resnet18 --width 0.25 --epochs 4 --seeds 0 1

Resumable: finished (variant, seed) results are kept in --out/results.json and skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from convsim_shrink.cs.premin import preminimize
from convsim_shrink.cs.redundancy import feature_map_similarity, mean_similarity
from convsim_shrink.cs.similarity import conv_layers, model_conv_similarity
from convsim_shrink.data import build_data, sample_batch
from convsim_shrink.io import atomic_write_bytes
from convsim_shrink.models import create_model
from convsim_shrink.recipe import DataConfig, PreminConfig, TrainConfig
from convsim_shrink.train import evaluate, fit, resolve_device, seed_everything


def build(args, seed):
    seed_everything(seed)
    return create_model(args.model, num_classes=10, in_channels=1, width=args.width)


def redundancy_table(args, images):
    rows = {}
    for seed in args.seeds:
        default = build(args, seed)
        ortho = build(args, seed)
        for _, m in conv_layers(ortho):
            torch.nn.init.orthogonal_(m.weight)
            # keep the default init's per-layer scale so only the directions differ
        for (_, a), (_, b) in zip(conv_layers(default), conv_layers(ortho)):
            with torch.no_grad():
                b.weight.mul_(a.weight.norm() / b.weight.norm())
        premin = build(args, seed)
        res = preminimize(premin, steps=args.premin_steps, lr=args.premin_lr)
        for name, model in (("default init", default), ("orthogonal init", ortho), ("CS pre-minimised", premin)):
            fm = feature_map_similarity(model, images)
            std = statistics.mean(v["std"] for v in fm.values())
            with torch.no_grad():
                cs = float(model_conv_similarity(model, normalized=True))
            rows.setdefault(name, []).append((mean_similarity(fm), std, cs))
        rows.setdefault("_premin_seconds", []).append(res.seconds)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--val-split", type=int, default=0, help="held out of training (as benchmarks/compare.py)")
    p.add_argument("--skip-redundancy", action="store_true")
    p.add_argument("--beta", type=float, default=1e-3)
    p.add_argument("--premin-steps", type=int, default=PreminConfig().steps)
    p.add_argument("--premin-lr", type=float, default=PreminConfig().lr)
    p.add_argument("--variants", nargs="+", default=["plain", "premin", "reg", "premin+reg"])
    p.add_argument("--out", default="bench-out/dense")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    data = build_data(DataConfig(subset=args.subset, val_split=args.val_split), batch_size=128)
    images = sample_batch(data.test, 512)
    if not args.skip_redundancy:
        print_redundancy(args, images)
    run_variants(args, data, results, results_file)


def print_redundancy(args, images):
    print(f"## Feature-map similarity ({args.model} width {args.width}, 512 real test images, seeds {args.seeds})\n")
    print("| init | mean abs cosine between channels' maps | activation std | normalized CS |\n|---|---|---|---|")
    for name, vals in redundancy_table(args, images).items():
        if name.startswith("_"):
            continue
        sims, stds, css = zip(*vals)
        print(f"| {name} | {statistics.mean(sims):.4f} ± {statistics.pstdev(sims):.4f} | {statistics.mean(stds):.3f} | {statistics.mean(css):.1f} |")


def run_variants(args, data, results, results_file):
    device = resolve_device("auto")
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}/{seed}"
            if key in results:
                continue
            model = build(args, seed)
            t0 = time.perf_counter()
            if "premin" in variant:
                preminimize(model, steps=args.premin_steps, lr=args.premin_lr)
            cfg = TrainConfig(epochs=args.epochs, warmup_epochs=0.5, cs_beta=args.beta if "reg" in variant else 0.0)
            r = fit(model, data.train, cfg, device=device, stage=variant, quiet=True)
            acc = evaluate(model, data.test)["acc"]
            with torch.no_grad():
                cs = float(model_conv_similarity(model, normalized=True))
            results[key] = {"acc": acc, "cs": cs, "seconds": time.perf_counter() - t0, "train_s": r.seconds}
            atomic_write_bytes(results_file, json.dumps(results, indent=1).encode())
            print(f"{key}: {acc:.2f}% ({results[key]['seconds']:.0f} s)", flush=True)

    print(f"\n## Dense accuracy ({args.epochs} epochs, full test set, seeds {args.seeds}, β = {args.beta})\n")
    print("| variant | top-1 % (mean ± std) | normalized CS after training | seconds per run |\n|---|---|---|---|")
    for variant in args.variants:
        rs = [results[f"{variant}/{s}"] for s in args.seeds if f"{variant}/{s}" in results]
        accs = [r["acc"] for r in rs]
        print(f"| {variant} | {statistics.mean(accs):.2f} ± {statistics.pstdev(accs):.2f} | {statistics.mean(r['cs'] for r in rs):.1f} | {statistics.mean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
