"""Does CS pre-minimisation help a dense model, and is it decorrelation or weight scale? (issue 15, part 1)

Four initialisations of the same model per seed (same Kaiming draw, then):
  plain     the initialiser's weights
  ours      pre-minimised, mode norm-preserving (normalized CS, all pairs, filter norms restored)
  paper     pre-minimised, mode paper (raw CS, adjacent pairs, Adam 0.002, norms not restored)
  shrink    the plain weights with every filter rescaled to the norm ``paper`` ends with (directions
            unchanged): the shrink-only control
each trained under two settings:
  ours      the shipped recipe's training (SGD 0.1 nesterov, weight decay 5e-4, cosine, warm-up, augmentation)
  paper     the paper's public code (SGD 0.1 momentum 0.9, no weight decay, step schedule at 50%/75%, no augmentation)
Validation accuracy after every epoch (a held-out split of the training set; choices are made on it),
test accuracy at the end.  Resumable: finished units are kept in OUT/results.json.

    python benchmarks/bench_init.py --out bench-out/init --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from convsim_shrink.cs.premin import filter_norms, preminimize, rescale_filters
from convsim_shrink.cs.similarity import model_conv_similarity
from convsim_shrink.data import build_data
from convsim_shrink.io import atomic_write_bytes
from convsim_shrink.models import create_model
from convsim_shrink.recipe import DataConfig, TrainConfig
from convsim_shrink.train import evaluate, fit, resolve_device, seed_everything

VARIANTS = ("plain", "ours", "paper", "shrink")
SETTINGS = {
    "ours": dict(augment=True, train=dict(warmup_epochs=0.5)),
    "paper": dict(augment=False, train=dict(nesterov=False, weight_decay=0.0, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)),
}


def initialised(args, seed: int, variant: str) -> tuple[torch.nn.Module, dict]:
    seed_everything(seed)
    model = create_model(args.model, num_classes=10, in_channels=1, width=args.width)
    info: dict = {}
    if variant == "ours":
        r = preminimize(model, steps=args.premin_steps, mode="norm-preserving")
        info["premin_seconds"] = r.seconds
    elif variant in ("paper", "shrink"):
        before = filter_norms(model)
        paper = model if variant == "paper" else _copy(model)
        r = preminimize(paper, steps=args.premin_steps, mode="paper", patience=args.premin_steps)
        after = filter_norms(paper)
        info["norm_ratio"] = statistics.mean(float(after[n].mean() / before[n].mean()) for n in before)
        info["premin_seconds"] = r.seconds
        if variant == "shrink":
            rescale_filters(model, after)
    with torch.no_grad():
        info["cs_init"] = float(model_conv_similarity(model, normalized=True))
    return model, info


def _copy(model):
    import copy

    return copy.deepcopy(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--val-split", type=int, default=2000)
    p.add_argument("--premin-steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench-out/init")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    device = resolve_device("auto")
    for setting in args.settings:
        s = SETTINGS[setting]
        data = build_data(DataConfig(subset=args.subset, val_split=args.val_split, augment=s["augment"]), batch_size=128)
        for seed in args.seeds:
            for variant in args.variants:
                key = f"{setting}/{variant}/{seed}"
                if key in results:
                    continue
                t0 = time.perf_counter()
                model, info = initialised(args, seed, variant)
                cfg = TrainConfig(epochs=args.epochs, **s["train"])
                r = fit(model, data.train, cfg, eval_loader=data.val, device=device, stage=key, quiet=True)
                with torch.no_grad():
                    info["cs_trained"] = float(model_conv_similarity(model, normalized=True))
                info.update(
                    val_curve=[h.get("val_acc") for h in r.history],
                    val=r.history[-1].get("val_acc"),
                    test=evaluate(model, data.test)["acc"],
                    seconds=time.perf_counter() - t0,
                )
                results[key] = info
                atomic_write_bytes(results_file, json.dumps(results, indent=1).encode())
                print(f"{key}: val {info['val']:.2f} test {info['test']:.2f} ({info['seconds']:.0f} s)", flush=True)
    print_tables(args, results)


def _t(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "–"
    sd = statistics.stdev(diffs)
    return f"{statistics.mean(diffs) / (sd / math.sqrt(len(diffs))):+.1f}" if sd > 0 else "∞"


def print_tables(args, results) -> None:
    for setting in args.settings:
        print(f"\n### Training settings: {setting} ({args.model} width {args.width}, {args.subset} training images, "
              f"{args.val_split} validation, {args.epochs} epochs, seeds {args.seeds})\n")
        epochs = ", ".join(f"e{i + 1}" for i in range(args.epochs))
        print(f"| init | validation top-1 % per epoch ({epochs}) | final val | test | val − plain (paired) | t | normalized CS init → trained | filter-norm ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for variant in args.variants:
            rs = [results.get(f"{setting}/{variant}/{s}") for s in args.seeds]
            rs = [r for r in rs if r]
            if not rs:
                continue
            curve = [statistics.mean(r["val_curve"][i] for r in rs) for i in range(len(rs[0]["val_curve"]))]
            plain = [results.get(f"{setting}/plain/{s}") for s in args.seeds]
            diffs = [r["val"] - q["val"] for r, q in zip([results.get(f"{setting}/{variant}/{s}") for s in args.seeds], plain) if r and q]
            nr = [r["norm_ratio"] for r in rs if "norm_ratio" in r]
            vals = [r["val"] for r in rs]
            print(
                f"| {variant} | {' '.join(f'{c:.1f}' for c in curve)} | {statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f} "
                f"| {statistics.mean(r['test'] for r in rs):.2f} | {statistics.mean(diffs):+.2f} | {_t(diffs) if variant != 'plain' else '–'} "
                f"| {statistics.mean(r['cs_init'] for r in rs):.0f} → {statistics.mean(r['cs_trained'] for r in rs):.0f} "
                f"| {statistics.mean(nr) if nr else 1:.3f} |"
            )


if __name__ == "__main__":
    main()
