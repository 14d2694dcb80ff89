"""CS pre-minimisation: the paper's iterative initialisation, in two modes.

``mode="norm-preserving"`` (the default): Adam minimises the *normalized* Convolutional Similarity of
every conv layer over all filter pairs, and after each step every filter is projected back onto its
original norm.  So only the filters' *directions* move: the scale the initialiser chose (Kaiming, ...)
is kept exactly, and the minimiser cannot lower CS by shrinking weights.

``mode="paper"``: what the paper's public code does (ZakariaeBelmekki98/Convolutional_Similarity,
``Main.py``): Adam at lr 0.002 on the *raw* CS over adjacent filter pairs, no norm restoring.  Raw CS
scales as ``||w||^4``, so this mode also shrinks the conv weights; :func:`rescale_filters` applies only
that shrinkage (a *shrink-only control* for telling decorrelation from weight scale).

Frozen weights (``requires_grad=False``) are the user's decision and are never changed.
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


#: per mode: (normalized CS, default lr, default pairs, restore filter norms)
MODES = {
    "norm-preserving": (True, 0.01, "all", True),
    "paper": (False, 0.002, "adjacent", False),
}


def _target_convs(model: nn.Module) -> list[nn.modules.conv._ConvNd]:
    """Trainable convs with at least two filters sharing an input (depthwise convs have no pairs)."""
    return [m for _, m in conv_layers(model) if m.out_channels // m.groups >= 2 and m.weight.requires_grad]


def filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of every filter of every conv, by layer name: ``{name: (out_channels,)}``."""
    return {name: m.weight.detach().reshape(m.weight.shape[0], -1).norm(dim=1).clone() for name, m in conv_layers(model)}


@torch.no_grad()
def rescale_filters(model: nn.Module, norms: dict[str, torch.Tensor]) -> None:
    """Scale every filter of the named convs to the given norm, keeping its direction (in place).

    With ``norms`` taken from a model after ``mode="paper"`` pre-minimisation, this is the shrink-only
    control: the paper's change of weight scale without its change of directions.

    Raises:
        ValueError: a layer's norms do not have one entry per filter.
    """
    layers = dict(conv_layers(model))
    for name, n in norms.items():
        w = layers[name].weight
        if n.shape != (w.shape[0],):
            raise ValueError(f"{name}: {tuple(n.shape)} norms for {w.shape[0]} filters")
        _project([w], [n.to(w.device, w.dtype)])


@torch.no_grad()
def _project(weights: list[torch.Tensor], norms: list[torch.Tensor]) -> None:
    for w, n in zip(weights, norms):
        current = w.reshape(w.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        w.mul_((n / current).view(-1, *([1] * (w.dim() - 1))))


def preminimize(
    model: nn.Module,
    *,
    steps: int = 200,
    lr: float | None = None,
    channels: str = "same",
    pairs: str | None = None,
    patience: int = 50,
    min_improvement: float = 1e-3,
    mode: str = "norm-preserving",
    quiet: bool = True,
) -> PreminResult:
    """Minimise the model's CS over its trainable conv kernels in place (see the module docstring).

    ``mode`` picks the objective and its defaults (:data:`MODES`): ``lr``/``pairs`` of None take the
    mode's.  Stops after ``steps`` steps or when the best value has not improved by ``min_improvement``
    (relative) for ``patience`` steps; the best weights seen are kept.  ``cs_before``/``cs_after`` are
    the mode's objective (normalized or raw CS).

    Raises:
        ValueError: an unknown ``mode``.
    """
    from ..train.progress import make_progress

    if mode not in MODES:
        raise ValueError(f"premin mode {mode!r} is not known; use one of {', '.join(MODES)}")
    normalized, default_lr, default_pairs, restore = MODES[mode]
    lr = default_lr if lr is None else lr
    pairs = default_pairs if pairs is None else pairs
    convs = _target_convs(model)
    weights = [m.weight for m in convs]
    opts = dict(channels=channels, pairs=pairs, normalized=normalized)
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
                if restore:
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
