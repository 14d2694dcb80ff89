"""Feature-map redundancy measured on real images: the quantity the paper's claim is about."""

from __future__ import annotations

import torch
from torch import nn

from ..models import evaluating
from .similarity import conv_layers


@torch.no_grad()
def feature_map_similarity(
    model: nn.Module, images: torch.Tensor, *, layers: list[str] | None = None, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Per conv layer: mean absolute cosine similarity between the feature maps of distinct channels
    (each channel's map flattened over space, per image, averaged over images and channel pairs), and
    the output's standard deviation (to see that activations keep their scale).

    Returns ``{layer: {"similarity": s, "std": sd}}`` in network order.
    """
    convs = dict(conv_layers(model))
    names = [n for n in convs if layers is None or n in layers]
    sums = {n: [0.0, 0.0, 0] for n in names}  # similarity sum, variance sum, images

    def hook(name):
        def fn(module, inputs, out):
            b, m = out.shape[:2]
            if m < 2:
                return
            maps = out.float().reshape(b, m, -1)
            unit = maps / maps.norm(dim=2, keepdim=True).clamp_min(1e-12)
            gram = unit @ unit.transpose(1, 2)  # (B, M, M) cosine similarities
            off = (gram.abs().sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).abs().sum(1)) / (m * (m - 1))
            sums[name][0] += float(off.sum())
            sums[name][1] += float(maps.var(dim=(1, 2)).sum())
            sums[name][2] += b

        return fn

    handles = [convs[n].register_forward_hook(hook(n)) for n in names]
    try:
        device = next(model.parameters()).device
        with evaluating(model):
            for start in range(0, len(images), batch_size):
                model(images[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {
        n: {"similarity": s / c, "std": (v / c) ** 0.5}
        for n, (s, v, c) in sums.items()
        if c > 0
    }


def mean_similarity(per_layer: dict[str, dict[str, float]]) -> float:
    values = [v["similarity"] for v in per_layer.values()]
    return sum(values) / len(values) if values else 0.0
