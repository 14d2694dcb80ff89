"""CS pre-minimisation: the paper's iterative initialisation, without collapsing the weight scale.

Adam (the paper's code uses it) minimises the *normalized* Convolutional Similarity of every conv
layer, and after each step every filter is projected back onto its original norm.  So only the
filters' *directions* move: the scale the initialiser chose (Kaiming, ...) is kept exactly, activations
keep their scale (``benchmarks/bench_premin.py`` measures it), and the minimiser cannot lower CS by
shrinking weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .similarity import conv_layers, model_conv_similarity


@dataclass
class PreminResult:
    cs_before: float
    cs_after: float
    steps: int
    seconds: float


def _target_convs(model: nn.Module) -> list[nn.modules.conv._ConvNd]:
    """Convs with at least two filters sharing an input (depthwise convs have no pairs)."""
    return [m for _, m in conv_layers(model) if m.out_channels // m.groups >= 2]


@torch.no_grad()
def _project(weights: list[torch.Tensor], norms: list[torch.Tensor]) -> None:
    for w, n in zip(weights, norms):
        current = w.reshape(w.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        w.mul_((n / current).view(-1, *([1] * (w.dim() - 1))))


def preminimize(
    model: nn.Module,
    *,
    steps: int = 200,
    lr: float = 0.01,
    channels: str = "same",
    pairs: str = "all",
    patience: int = 50,
    min_improvement: float = 1e-3,
    quiet: bool = True,
) -> PreminResult:
    """Minimise the model's normalized CS over its conv kernels in place, keeping every filter's norm.

    Stops after ``steps`` steps or when the best value has not improved by ``min_improvement`` (relative)
    for ``patience`` steps; the best weights seen are kept.
    """
    from .train.progress import make_progress

    convs = _target_convs(model)
    weights = [m.weight for m in convs]
    opts = dict(channels=channels, pairs=pairs, normalized=True)
    with torch.no_grad():
        before = float(model_conv_similarity(model, **opts))
    if steps == 0 or not weights:
        return PreminResult(before, before, 0, 0.0)
    norms = [w.detach().reshape(w.shape[0], -1).norm(dim=1).clone() for w in weights]
    grad_state = [w.requires_grad for w in weights]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    other_state = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)
    best, best_step = before, 0
    best_weights = [w.detach().clone() for w in weights]
    t0 = time.perf_counter()
    done = 0
    try:
        with make_progress(quiet) as progress:
            task = progress.add_task("CS pre-minimisation", total=steps, info="")
            for step in range(1, steps + 1):
                optimizer.zero_grad(set_to_none=True)
                value = model_conv_similarity(model, **opts)
                value.backward()
                optimizer.step()
                _project(weights, norms)
                current = float(value.detach())
                done = step
                if current < best * (1 - min_improvement):
                    best, best_step = current, step
                    for b, w in zip(best_weights, weights):
                        b.copy_(w.detach())
                progress.update(task, advance=1, info=f"CS {current:.4g} (start {before:.4g})")
                if step - best_step >= patience:
                    break
        with torch.no_grad():
            for b, w in zip(best_weights, weights):
                w.copy_(b)
            after = float(model_conv_similarity(model, **opts))
    finally:
        for w, s in zip(weights, grad_state):
            w.requires_grad_(s)
        for p, s in zip(others, other_state):
            p.requires_grad_(s)
        for w in weights:
            w.grad = None
    return PreminResult(before, after, done, time.perf_counter() - t0)
