"""Channel importance criteria, all as torch-pruning ``Importance`` objects: a group in, one score per
channel out, higher = keep.

``convsim`` (ours, the default) ranks channels by their *residual* Convolutional Similarity: after CS
pre-minimisation and training, a channel whose kernels are still similar (at any shift) to another
kept channel's is redundant.  The baselines use torch-pruning's implementations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from .errors import unknown
from .similarity import pairwise_similarity


def similarity_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Cosine-like residual similarity of filters, in [0, 1]: the normalized pairwise CS divided by the
    filters' self-similarities (Cauchy-Schwarz on the power spectra bounds it by 1; an exact duplicate,
    or a scaled copy, scores 1)."""
    g = pairwise_similarity(weight.detach().double(), normalized=True, groups=groups)
    d = g.diagonal().clamp_min(1e-30).sqrt()
    return (g / d[:, None] / d[None, :]).clamp(0, 1)


def greedy_redundancy_order(sim: torch.Tensor, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Scores in (0, 1]: channels removed one at a time, each time the one most similar to a channel that
    is still kept.  The first removed scores lowest.  Of a pair of duplicates only one goes early: once
    it is removed, the other has no similar partner left.

    ``tie_break`` (e.g. filter norms): among equally redundant channels, the smaller goes first.
    """
    m = sim.shape[0]
    s = sim.clone().float()
    s.fill_diagonal_(-1.0)
    alive = torch.ones(m, dtype=torch.bool)
    scores = torch.empty(m)
    eps = torch.zeros(m) if tie_break is None else 1e-6 * (tie_break.float() / tie_break.float().max().clamp_min(1e-30))
    nearest = s.max(dim=1).values  # similarity to the most similar kept channel
    for k in range(m):
        cand = torch.where(alive, nearest - eps, torch.tensor(float("-inf")))
        i = int(cand.argmax())
        scores[i] = (k + 1) / m
        alive[i] = False
        s[:, i] = -1.0
        # only channels whose nearest neighbour was i need recomputing
        stale = alive & (sim[:, i].float() >= nearest - 1e-12)
        if stale.any():
            nearest[stale] = s[stale].max(dim=1).values
    return scores


class ConvSimImportance(tp.importance.Importance):
    """Residual-similarity importance for whole dependency groups.

    For every conv whose *output* channels the group prunes (residual-coupled convs across a stage,
    expansion convs of inverted residuals, ...), channels are ordered by greedy redundancy
    (:func:`greedy_redundancy_order`), and the scores are averaged over the group's convs.  Depthwise
    convs are skipped (a single filter per group has no partner); a group without a scoreable conv falls
    back to the L2 magnitude.  ``magnitude`` > 0 mixes in the (normalised) L2 norm of the filters.
    """

    def __init__(self, magnitude: float = 0.0):
        self.magnitude = magnitude
        self._fallback = tp.importance.GroupMagnitudeImportance(p=2)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        total = torch.zeros(n)
        count = torch.zeros(n)
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            if fn is not tp.prune_conv_out_channels or not isinstance(layer, nn.modules.conv._ConvNd):
                continue
            if getattr(layer, "transposed", False) or layer.groups == layer.out_channels or layer.weight.shape[0] < 2:
                continue
            if layer.groups > 1:
                continue  # grouped (not depthwise): pairs cross the selected indices' groups; leave to others
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            w = layer.weight.detach()[list(idxs)]
            norms = w.flatten(1).norm(dim=1).cpu()
            scores = greedy_redundancy_order(similarity_matrix(w).cpu(), tie_break=norms)
            if self.magnitude:
                scores = scores + self.magnitude * norms / norms.max().clamp_min(1e-30)
            idx = torch.tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, idx, scores.float())
            count.scatter_add_(0, idx, torch.ones(len(idx)))
        if count.sum() == 0:
            return self._fallback(group)
        mean = total / count.clamp_min(1)
        if (count == 0).any():  # channels no conv scored: rank them by magnitude below the others' median
            mean[count == 0] = mean[count > 0].median()
        return mean


def _taylor() -> tp.importance.Importance:
    return tp.importance.GroupTaylorImportance()


CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "convsim": ConvSimImportance,
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": _taylor,
    "fpgm": tp.importance.FPGMImportance,
    "lamp": tp.importance.LAMPImportance,
    "bn-scale": tp.importance.BNScaleImportance,
    "random": tp.importance.RandomImportance,
}

#: criteria that need gradients of the task loss on calibration data before scoring
NEEDS_GRADIENTS = {"taylor"}

DESCRIPTIONS = {
    "convsim": "residual Convolutional Similarity, greedy (ours)",
    "l1": "L1 norm of the group's weights",
    "l2": "L2 norm of the group's weights",
    "taylor": "first-order Taylor (weight x gradient) on calibration batches",
    "fpgm": "filter pruning via geometric median",
    "lamp": "layer-adaptive magnitude pruning score",
    "bn-scale": "batch-norm scaling factors",
    "random": "uniformly random (a sanity baseline)",
}


def list_criteria() -> list[str]:
    return list(CRITERIA)


def make_importance(name: str, **kwargs) -> tp.importance.Importance:
    if name not in CRITERIA:
        raise unknown("criterion", name, CRITERIA)
    return CRITERIA[name](**kwargs)
