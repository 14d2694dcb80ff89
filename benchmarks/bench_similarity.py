"""Speed of Convolutional Similarity: the fast (spectral, linear in M) form against the direct form,
and the whole-ResNet18 sum against one training step, measured side by side in one run.

    python benchmarks/bench_similarity.py [--repeats 5] [--threads N]

Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision
from torch import nn

from convsim_shrink.cs.similarity import conv_layers, conv_similarity, conv_similarity_reference, model_conv_similarity


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def fwd_bwd(weight: torch.Tensor, fn):
    def run():
        w = weight.detach().requires_grad_(True)
        fn(w).backward()

    return run


def resnet18_small_stem() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    w = torch.randn(256, 256, 3, 3) * 0.02
    fast = timed(fwd_bwd(w, conv_similarity), args.repeats)
    direct = timed(fwd_bwd(w, conv_similarity_reference), max(1, args.repeats // 2))
    print("\n| 256×256×3×3 layer, fwd+bwd | seconds |\n|---|---|")
    print(f"| fast (spectral) | {fast:.5f} |\n| direct (conv per channel) | {direct:.3f} |")
    print(f"| **speed-up** | **{direct / fast:.0f}×** |")

    model = resnet18_small_stem()
    n_conv = sum(1 for _ in conv_layers(model))

    def cs_model():
        model.zero_grad(set_to_none=True)
        model_conv_similarity(model).backward()

    cs_time = timed(cs_model, args.repeats)

    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(bf16: bool, channels_last: bool):
        m = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(m(xx), y)
            loss.backward()
            opt.step()

        return run

    reps = max(2, args.repeats // 2)
    step_fp32 = timed(step(False, False), reps)
    step_bf16 = timed(step(True, True), reps)
    print(f"\n| ResNet18 (3×3 stem, {n_conv} convs) | seconds | CS share of the step |\n|---|---|---|")
    print(f"| CS sum over all convs, fwd+bwd | {cs_time:.4f} | |")
    print(f"| train step, batch 128, 32×32, fp32 | {step_fp32:.3f} | {100 * cs_time / step_fp32:.1f}% |")
    print(f"| train step, batch 128, 32×32, bf16 autocast + channels_last | {step_bf16:.3f} | {100 * cs_time / step_bf16:.1f}% |")


if __name__ == "__main__":
    main()
