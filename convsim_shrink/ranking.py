"""Channel importance criteria, all as torch-pruning ``Importance`` objects: a group in, one score per
channel out, higher = keep.

``convsim`` and ``convsim-taylor`` (ours; ``convsim-taylor`` with global pruning is the pipeline's
default) rank channels by their *residual* Convolutional Similarity: after training, a channel whose
kernels are still similar (at any shift) to another kept channel's is redundant, so each greedy step
removes the channel whose importance (group L2 norm, or first-order Taylor) discounted by that
redundancy is lowest.  The baselines use torch-pruning's implementations.
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


def greedy_removal(
    sim: torch.Tensor, tie_break: torch.Tensor | None = None, *, weight: torch.Tensor | None = None, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels in the order they are removed one at a time, and each one's value when removed.

    Each time the channel with the lowest ``weight_i * (1 - strength * s_i)`` goes, where ``s_i`` is its
    similarity to the most similar channel that is still kept (``weight`` defaults to 1: pure
    redundancy).  Of a pair of duplicates only one goes early: once it is removed, the other has no
    similar partner left.  ``tie_break`` (e.g. filter norms): among equally scored channels, the
    smaller goes first.
    """
    m = sim.shape[0]
    s = sim.clone().float()
    s.fill_diagonal_(-1.0)
    alive = torch.ones(m, dtype=torch.bool)
    order = torch.empty(m, dtype=torch.long)
    values = torch.empty(m)
    w = torch.ones(m) if weight is None else weight.float().clamp_min(0)
    eps = torch.zeros(m) if tie_break is None else 1e-6 * (tie_break.float() / tie_break.float().max().clamp_min(1e-30))
    nearest = s.max(dim=1).values.clamp_min(0)  # similarity to the most similar kept channel
    inf = torch.tensor(float("inf"))
    for k in range(m):
        keep_value = w * (1 - strength * nearest)
        i = int(torch.where(alive, keep_value + eps, inf).argmin())
        order[k], values[k] = i, keep_value[i]
        alive[i] = False
        s[:, i] = -1.0
        # only channels whose nearest partner was i need recomputing
        stale = alive & (sim[:, i].float() >= nearest - 1e-12)
        if stale.any():
            nearest[stale] = s[stale].max(dim=1).values.clamp_min(0)
    return order, values


def greedy_redundancy_order(
    sim: torch.Tensor, tie_break: torch.Tensor | None = None, *, weight: torch.Tensor | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Scores in (0, 1] from :func:`greedy_removal`'s order: the first channel removed scores 1/m."""
    order, _ = greedy_removal(sim, tie_break, weight=weight, strength=strength)
    scores = torch.empty(len(order))
    scores[order] = torch.arange(1, len(order) + 1, dtype=torch.float32) / len(order)
    return scores


def lamp_scores(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scores comparable across layers for global pruning, in the removal ``order``.

    Layer-adaptive normalisation (LAMP, Lee et al., ICLR 2021) applied to the values at removal (made
    non-decreasing along the order): the k-th removed scores ``v_k² / Σ_{j ≥ k} v_j²``.  Within a layer
    the order is unchanged; across layers, a channel scores low when it is small relative to what the
    layer keeps after it, whatever the layer's scale.
    """
    v = torch.cummax(values.double().clamp_min(0), dim=0).values.square()
    suffix = v.flip(0).cumsum(0).flip(0).clamp_min(1e-300)
    scores = torch.empty(len(order), dtype=torch.float64)
    scores[order] = v / suffix
    # ties (e.g. all-zero values) keep the removal order
    scores[order] += torch.arange(len(order), dtype=torch.float64) * 1e-12
    return scores.float()


class ConvSimImportance(tp.importance.Importance):
    """Residual-similarity importance for whole dependency groups.

    For every conv whose *output* channels the group prunes (residual-coupled convs across a stage,
    expansion convs of inverted residuals, ...), the cosine-like residual similarity of its filters
    (:func:`similarity_matrix`) is averaged into one matrix for the group.  Channels are then removed
    greedily (:func:`greedy_removal`): each step drops the channel whose *group magnitude*
    (L2 over the group's convs, BN and next-layer inputs, as torch-pruning's magnitude criterion)
    discounted by its redundancy, ``magnitude * (1 - strength * similarity to its nearest kept
    partner)``, is lowest.  The scores are the removal values, layer-adaptively normalised
    (:func:`lamp_scores`), so the same criterion serves local pruning (only the order within a group
    matters) and global pruning (scores compare across groups).  ``magnitude="taylor"`` weighs by
    first-order Taylor importance (|weight × gradient| over the group; needs task-loss gradients on
    calibration batches) instead of the weights' L2 norm; ``magnitude=False`` ranks by redundancy alone.

    Depthwise convs are skipped (a single filter per group has no partner), as are grouped convs; a
    group without a scoreable conv falls back to the magnitude.
    """

    def __init__(self, strength: float = 1.0, magnitude: bool | str = True):
        if magnitude not in (True, False, "l2", "taylor"):
            raise ValueError(f"magnitude must be True/'l2', 'taylor' or False, not {magnitude!r}")
        self.strength = strength
        self.magnitude = magnitude
        if magnitude == "taylor":
            self._magnitude = tp.importance.GroupTaylorImportance(normalizer="mean")
        else:
            self._magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        sim_sum = torch.zeros(n, n, dtype=torch.float64)
        counted = 0
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.layer, dep.pruning_fn
            # bound methods: compare with ==, a fresh method object is made on every attribute access
            if fn != tp.prune_conv_out_channels or not isinstance(layer, nn.modules.conv._ConvNd):
                continue
            if getattr(layer, "transposed", False) or layer.groups > 1 or layer.weight.shape[0] < 2:
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs) or len(root_idxs) != n:
                continue
            order = torch.tensor(root_idxs, dtype=torch.long)
            sim = similarity_matrix(layer.weight.detach()[list(idxs)]).cpu()
            placed = torch.zeros(n, n, dtype=torch.float64)
            placed[order[:, None], order[None, :]] = sim
            sim_sum += placed
            counted += 1
        magnitude = self._magnitude(group)
        if counted == 0:
            if magnitude is None:
                return None
            m = magnitude.detach().cpu().float()
            order = m.argsort(stable=True)
            return lamp_scores(order, m[order])
        weight = magnitude.cpu() if (self.magnitude is not False and magnitude is not None) else None
        order, values = greedy_removal(
            sim_sum / counted, tie_break=magnitude.cpu() if magnitude is not None else None, weight=weight, strength=self.strength
        )
        return lamp_scores(order, values)


def _taylor() -> tp.importance.Importance:
    return tp.importance.GroupTaylorImportance()


CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "convsim-taylor": lambda: ConvSimImportance(magnitude="taylor"),
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
NEEDS_GRADIENTS = {"taylor", "convsim-taylor"}

DESCRIPTIONS = {
    "convsim-taylor": "residual Convolutional Similarity, greedy, weighted by Taylor importance (ours, the default)",
    "convsim": "residual Convolutional Similarity, greedy, weighted by group L2 norm (ours, needs no data)",
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
