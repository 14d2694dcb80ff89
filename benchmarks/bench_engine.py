"""Engine speed, side by side in one run: training images/s per precision path, the cost of CS
pre-minimisation against one training epoch, and the CS regulariser's overhead per step.

    python benchmarks/bench_engine.py [--width 0.25] [--steps 20]

ResNet18 (3x3 stem) at batch 128 on 28x28 single-channel images (Fashion-MNIST's shape).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convsim_shrink.cs.premin import preminimize
from convsim_shrink.models import create_model
from convsim_shrink.recipe import PreminConfig, TrainConfig
from convsim_shrink.train import Schedule, cs_regularizer, make_optimizer, resolve_precision, train_one_epoch


class Batches:
    def __init__(self, n, batch=128, size=28, channels=1):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, channels, size, size, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.n = n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y

    def __len__(self):
        return self.n


def step_time(width: float, precision: str, channels_last: bool, steps: int, beta: float = 0.0, every: int = 1) -> float:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, width=width)
    prec = resolve_precision(torch.device("cpu"), precision, channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())
    extra = (cs_regularizer(beta, every=every),) if beta else ()
    sched = Schedule(0.05, 10_000)
    train_one_epoch(model, Batches(3), opt, sched, prec=prec, extra=extra)  # warm-up
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        train_one_epoch(model, Batches(steps), opt, sched, prec=prec, extra=extra)
        samples.append((time.perf_counter() - t0) / steps)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| ResNet18 width | path | s / step (batch 128) | images/s | vs fp32 |\n|---|---|---|---|---|")
    results = {}
    for w in args.widths:
        base = None
        for label, prec, cl in (("fp32", "fp32", False), ("fp32 + channels_last", "fp32", True), ("bf16 autocast + channels_last", "bf16", True)):
            t = step_time(w, prec, cl, args.steps)
            base = base or t
            results[(w, label)] = t
            print(f"| {w} | {label} | {t:.3f} | {128 / t:.0f} | {base / t:.2f}× |", flush=True)

    print("\n| ResNet18 width | step without CS reg. | with CS reg. every step | overhead | every 4th step (default) | overhead |\n|---|---|---|---|---|---|")
    for w in args.widths:
        plain = step_time(w, "bf16", True, args.steps)
        reg = step_time(w, "bf16", True, args.steps, beta=1e-3)
        reg4 = step_time(w, "bf16", True, max(args.steps, 8), beta=1e-3, every=4)
        print(f"| {w} | {plain:.3f} s | {reg:.3f} s | {100 * (reg / plain - 1):.1f}% | {reg4:.3f} s | {100 * (reg4 / plain - 1):.1f}% |", flush=True)

    print(f"\n| ResNet18 width | pre-minimisation ({PreminConfig().steps} steps, the default) | one Fashion-MNIST epoch (468 steps, bf16) | share |\n|---|---|---|---|")
    for w in args.widths:
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=10, in_channels=1, width=w)
        cfg = PreminConfig()
        res = preminimize(model, steps=cfg.steps, lr=cfg.lr, patience=cfg.steps)
        epoch = results[(w, "bf16 autocast + channels_last")] * 468
        print(f"| {w} | {res.seconds:.1f} s (CS {res.cs_before:.0f} → {res.cs_after:.0f}) | {epoch:.0f} s | {100 * res.seconds / epoch:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
