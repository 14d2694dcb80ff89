"""Channel importance criteria, all as torch-pruning ``Importance`` objects: a group in, one score per
channel out, higher = keep.

``convsim`` and ``convsim-taylor`` (ours; ``convsim-taylor`` with global pruning is the pipeline's
default) rank channels by their *residual* Convolutional Similarity: after training, a channel whose
kernels are still similar (at any shift) to another kept channel's is redundant, so each greedy step
removes the channel whose importance (group L2 norm, or first-order Taylor) discounted by that
redundancy is lowest.  The baselines use torch-pruning's implementations.

The registry holds one :class:`Criterion` record per name (factory, options, whether it needs
gradients, whether it is meant for global pruning, description); ``make_importance(name, **options)``
builds one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..cs.similarity import pairwise_similarity
from ..errors import ConfigError, unknown


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
    group without a scoreable conv, or whose magnitude torch-pruning gives over another number of channels
    than the group's root has, falls back to the magnitude.
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
        if magnitude is not None and magnitude.numel() != n:
            # torch-pruning scored the group over another index set than its root's (GhostNet's concat
            # then slice: Taylor importance counts only the channels that survive the slice); rank as it does
            counted = 0
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


class ResidualImportance(tp.importance.Importance):
    """What the kept channels cannot reproduce: the output a group's consumers lose when a channel goes
    and every consumer is compensated (:mod:`convsim_shrink.prune.compensation`).

    For a consumer layer with input covariance Σ (centred, over calibration inputs) and weights W, removing
    input channel p and refitting it from the other channels leaves the residual variance
    ``1 / (Σ⁻¹)_pp`` of x_p, which reaches the layer's output through ``‖W[:, p]‖²`` (over outputs and
    kernel positions; positions are taken as uncorrelated).  A channel's cost is that product summed over
    every consumer of its dependency group (each block's first conv, the shortcut, the classifier, each on
    its *own* input).  Channels are removed greedily, cheapest first, and after each removal the
    consumers' inverse covariances are downdated (the kept set shrinks, so the others' residuals grow):
    the greedy selection of ThiNet (Luo et al., ICCV 2017) and of the optimal brain surgeon's
    ``w² / (H⁻¹)_pp`` (Hassibi & Stork, 1993), made to work on coupled groups.  The costs at removal are
    layer-adaptively normalised (:func:`lamp_scores`), so they compare across groups for global pruning.

    Needs :class:`~convsim_shrink.prune.compensation.InputStatistics` of the model being pruned in
    ``statistics`` (the prune stage sets it); ``bind(model)`` names the copy being scored.  A group
    without a consumer that has statistics (e.g. read only by depthwise convs) falls back to its L2
    magnitude, normalised the same way.  ``ridge``: added to Σ's diagonal, relative to its mean.
    """

    def __init__(self, ridge: float = 1e-3):
        self.ridge = ridge
        self.statistics = None
        self._names: dict[int, str] = {}
        self._magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")

    def bind(self, model: nn.Module) -> None:
        self._names = {id(m): n for n, m in model.named_modules()}

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if self.statistics is None:
            raise ConfigError("criterion 'residual' needs input statistics of the model; the prune stage collects them "
                              "(prune.compensation_batches training batches)")
        n = len(group[0].idxs)
        consumers = []  # (inverse covariance, ‖W[:, p]‖² per input position, root channel of each position)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if getattr(dep.pruning_fn, "__name__", "") != "prune_in_channels":
                continue
            if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            name = self._names.get(id(layer))
            root_idxs = group[i].root_idxs
            if name is None or name not in self.statistics or any(r is None for r in root_idxs):
                continue
            cov = self.statistics.covariance(name)
            if cov.shape[0] != layer.weight.shape[1]:
                continue
            lam = self.ridge * float(cov.diagonal().mean().clamp_min(1e-12))
            inv = torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype))
            w = layer.weight.detach().double().cpu().transpose(0, 1).reshape(layer.weight.shape[1], -1).square().sum(1)
            pos = torch.tensor([int(j) for j in idxs], dtype=torch.long)
            consumers.append((inv, w[pos], pos, torch.tensor([int(r) for r in root_idxs], dtype=torch.long)))
        if not consumers:
            magnitude = self._magnitude(group)
            if magnitude is None:
                return None
            m = magnitude.detach().cpu().float()
            order = m.argsort(stable=True)
            return lamp_scores(order, m[order])
        alive = torch.ones(n, dtype=torch.bool)
        order = torch.empty(n, dtype=torch.long)
        values = torch.empty(n, dtype=torch.float64)
        inf = torch.tensor(float("inf"), dtype=torch.float64)
        for k in range(n):
            cost = torch.zeros(n, dtype=torch.float64)
            for inv, w, pos, roots in consumers:
                diag = inv.diagonal()[pos].clamp_min(1e-300)
                cost.index_add_(0, roots, w / diag)
            r = int(torch.where(alive, cost, inf).argmin())
            order[k], values[k] = r, cost[r]
            alive[r] = False
            for inv, _, pos, roots in consumers:
                for p in pos[roots == r].tolist():
                    d = inv[p, p]
                    if d > 0:
                        inv -= torch.outer(inv[:, p], inv[p, :]) / d
                    inv[p, :] = 0
                    inv[:, p] = 0
        return lamp_scores(order, values)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Criterion:
    """One channel-importance criterion: its name, how to build it, and what it needs.

    ``factory(**options)`` returns a torch-pruning ``Importance``; its keyword arguments are the
    criterion's options (variants are options, not new names: ``make_importance("convsim", strength=0.5)``).
    ``needs_gradients``: scoring reads task-loss gradients, accumulated on calibration batches first.
    ``global_ranking``: scores are comparable across layers, so the criterion is meant for global pruning
    (``prune.global_pruning``); the others rank channels well only within a layer.
    ``needs_statistics``: scoring reads the input covariances of the model's layers
    (:func:`~convsim_shrink.prune.compensation.collect_input_statistics`), set as the importance's ``statistics``.
    """

    name: str
    factory: Callable[..., tp.importance.Importance]
    description: str
    needs_gradients: bool = False
    global_ranking: bool = False
    needs_statistics: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The options and their defaults."""
        return {
            n: p.default for n, p in inspect.signature(self.factory).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def create(self, **options: Any) -> tp.importance.Importance:
        """The ``Importance`` with these options; an unknown option is a :class:`ConfigError`."""
        extra = sorted(set(options) - set(self.options))
        if extra:
            known = ", ".join(self.options) or "none"
            raise ConfigError(f"criterion '{self.name}' has no option {', '.join(extra)} (its options: {known}; see prune.criterion_options)")
        return self.factory(**options)


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    """Add ``criterion`` to the registry under its name (a name is registered once)."""
    if criterion.name in _CRITERIA:
        raise ValueError(f"criterion '{criterion.name}' is already registered")
    _CRITERIA[criterion.name] = criterion
    return criterion


def _strength(strength: float) -> float:
    if not 0 <= strength <= 1:
        raise ConfigError(f"criterion option strength = {strength} is out of range; give a value in [0, 1] (1 = the full redundancy discount)")
    return float(strength)


def _convsim_taylor(strength: float = 1.0) -> tp.importance.Importance:
    return ConvSimImportance(strength=_strength(strength), magnitude="taylor")


def _convsim(strength: float = 1.0, magnitude: bool = True) -> tp.importance.Importance:
    if not isinstance(magnitude, bool):
        raise ConfigError(
            f"criterion 'convsim' option magnitude = {magnitude!r} is invalid: give true (weight by the group's L2 norm) "
            "or false (redundancy alone); for Taylor weighting use criterion convsim-taylor"
        )
    return ConvSimImportance(strength=_strength(strength), magnitude=magnitude)


for _criterion in (
    Criterion(
        "convsim-taylor", _convsim_taylor,
        "residual Convolutional Similarity, greedy, weighted by Taylor importance (ours, the default)",
        needs_gradients=True, global_ranking=True,
    ),
    Criterion(
        "convsim", _convsim,
        "residual Convolutional Similarity, greedy, weighted by group L2 norm (ours, needs no data)",
        global_ranking=True,
    ),
    Criterion(
        "residual", lambda ridge=1e-3: ResidualImportance(ridge=float(ridge)),
        "what the kept channels cannot reproduce: residual variance after least-squares compensation, weighted by "
        "the consumers' weights, greedy (ThiNet-style), LAMP-normalised (needs data)",
        global_ranking=True, needs_statistics=True,
    ),
    Criterion("l1", lambda: tp.importance.GroupMagnitudeImportance(p=1), "L1 norm of the group's weights"),
    Criterion("l2", lambda: tp.importance.GroupMagnitudeImportance(p=2), "L2 norm of the group's weights"),
    Criterion(
        "taylor", lambda: tp.importance.GroupTaylorImportance(),
        "first-order Taylor (weight x gradient) on calibration batches", needs_gradients=True,
    ),
    Criterion("fpgm", lambda: tp.importance.FPGMImportance(), "filter pruning via geometric median"),
    Criterion("lamp", lambda: tp.importance.LAMPImportance(), "layer-adaptive magnitude pruning score", global_ranking=True),
    Criterion("bn-scale", lambda: tp.importance.BNScaleImportance(), "batch-norm scaling factors"),
    Criterion("random", lambda: tp.importance.RandomImportance(), "uniformly random (a sanity baseline)", global_ranking=True),
):
    register_criterion(_criterion)
del _criterion


def list_criteria() -> list[str]:
    return list(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    """The registered :class:`Criterion`; an unknown name is an :class:`UnknownNameError` listing the known ones."""
    if name not in _CRITERIA:
        raise unknown("criterion", name, _CRITERIA)
    return _CRITERIA[name]


def make_importance(name: str, **options: Any) -> tp.importance.Importance:
    """The importance of criterion ``name`` built with ``options`` (see :attr:`Criterion.options`)."""
    return get_criterion(name).create(**options)
