"""Structural pruning with torch-pruning's dependency graph: measuring a model (:func:`measure`,
:func:`channel_counts`, :func:`channel_costs`), pruning a copy at a channel ratio (:func:`prune_copy`,
scores cached across copies by :class:`CachedImportance`), the per-layer limit (:func:`layer_floors`) and
pruning-aware training (:func:`group_sparsity_regularizer`).  The search for a measured target that uses
them is :mod:`.search`.  The classifier's outputs are never pruned.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError
from ..models import classifier_of, evaluating
from .memory import release_memory
from .safety.limits import GraphLimitError, bounded
from .sparsity import GroupNormRegularizer


@dataclass
class Size:
    params: int
    macs: int


def measure(model: nn.Module, example_inputs: torch.Tensor) -> Size:
    """Parameters and MACs (per batch of ``example_inputs``; one image for a (1, C, H, W) input) of
    ``model`` in eval mode (``tp.utils.count_ops_and_params``); its mode is restored."""
    with evaluating(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return Size(int(params), int(macs))


def channel_costs(model: nn.Module, example_inputs: torch.Tensor) -> dict[tuple[str, str], float]:
    """MACs one channel of each conv and linear layer accounts for, at ``example_inputs``' size.

    Returns ``{(layer name, "out"): MACs per output channel, (layer name, "in"): MACs per input
    channel}`` for one image. A conv's output channel costs ``in/groups * kh * kw * H_out * W_out`` MACs,
    an input channel ``out/groups * kh * kw * H_out * W_out``; a linear layer's ``in_features`` and
    ``out_features``. Batch norm and activations are left out (a few operations per pixel), and so are
    transposed convs (their output size does not give their MACs this way).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)
    ]
    try:
        with evaluating(model), torch.no_grad():
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    costs: dict[tuple[str, str], float] = {}
    for name, m in model.named_modules():
        if name not in shapes:
            continue
        if isinstance(m, nn.Linear):
            positions = math.prod(shapes[name][1:-1]) if len(shapes[name]) > 2 else 1
            costs[(name, "out")], costs[(name, "in")] = float(m.in_features * positions), float(m.out_features * positions)
        else:
            per_position = math.prod(m.kernel_size) * math.prod(shapes[name][2:])
            costs[(name, "out")] = float(m.in_channels // m.groups * per_position)
            costs[(name, "in")] = float(m.out_channels // m.groups * per_position)
    return costs


class CachedImportance(tp.importance.Importance):
    """Scores a group once and reuses them for identical groups of other copies of the same model.

    With ``costs`` (:func:`channel_costs` of the base model) and ``cost_exponent`` > 0, a group's scores
    are divided by ``(MACs one of its channels accounts for) ** cost_exponent``: importance per unit of
    compute, so that global pruning removes compute rather than parameters where compute is what a
    MACs or latency target counts (the cost is summed over the group's convs and linears, the layer
    whose channels go and the layers that read them).
    """

    def __init__(self, base: tp.importance.Importance, costs: dict[tuple[str, str], float] | None = None,
                 cost_exponent: float = 0.0):
        self.base = base
        self.cache: dict[tuple, torch.Tensor | None] = {}
        self.names: dict[int, str] = {}
        self.costs = costs if cost_exponent else None
        self.cost_exponent = cost_exponent

    def bind(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        if hasattr(self.base, "bind"):
            self.base.bind(model)

    def __call__(self, group):
        key = tuple(
            (self.names.get(id(dep.layer), "?"), dep.pruning_fn.__name__, len(idxs)) for dep, idxs in group
        )
        if key not in self.cache:
            scores = self.base(group)
            if scores is not None and self.costs:
                scores = scores / self.group_cost(group) ** self.cost_exponent
            self.cache[key] = None if scores is None else scores.detach().clone()
        cached = self.cache[key]
        return None if cached is None else cached.clone()

    def group_cost(self, group) -> float:
        """MACs one channel of ``group`` accounts for (at least 1)."""
        total = 0.0
        for dep, _ in group:
            name = self.names.get(id(dep.layer))
            fn = getattr(dep.pruning_fn, "__name__", "")
            side = "out" if fn.endswith("out_channels") else "in" if fn.endswith("in_channels") else None
            if name is not None and side is not None:
                total += self.costs.get((name, side), 0.0)
        return max(total, 1.0)


def layer_floors(channels: dict[str, int], max_layer_ratio: float, round_to: int | None) -> dict[str, int]:
    """The fewest channels each layer may keep: no more than ``max_layer_ratio`` of its ``channels``
    removed, and, with ``round_to``, a multiple of it (the whole layer where that multiple is more than
    the layer has). Torch-pruning's own limit is looser: it truncates a layer's kept channels
    (``int(C * (1 - ratio))``), rounds them down to ``round_to``, and with global pruning lets one layer
    lose any share while the whole model keeps its ratio."""
    floors = {}
    for name, c in channels.items():
        keep = c - math.floor(c * max_layer_ratio + 1e-9)
        if round_to:
            keep = math.ceil(keep / round_to) * round_to
        floors[name] = min(keep, c)
    return floors



def group_roots(model, example_inputs, ignored) -> list[str]:
    """Names of the root modules of the model's prunable groups, in network order."""
    names = {id(m): n for n, m in model.named_modules()}
    roots = []
    with bounded("listing the channel groups", model):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
            name = names.get(id(group[0].dep.target.module))
            if name is not None and name not in roots:
                roots.append(name)
    return roots


def prune_copy(model, example_inputs, importance, ratio, *, round_to, global_pruning, max_layer_ratio, ignored, overrides=None,
               compensator=None):
    """A pruned copy of ``model`` (torch-pruning's ``MetaPruner`` at channel ratio ``ratio``, or per root
    layer ``overrides``; ``ignored`` modules of ``model`` are left alone); with a ``compensator``
    (:class:`~convsim_shrink.prune.compensation.Compensator`), every group's consumers are compensated just before
    the group is removed.  The copy has no gradients (``model``'s are copied for the scoring, then dropped)."""
    release_memory(model)  # the copies dropped since the last one (torch-pruning's graphs hold them in cycles)
    trial = copy.deepcopy(model)
    for p, q in zip(model.parameters(), trial.parameters()):  # deepcopy drops .grad; Taylor needs it
        if p.grad is not None:
            q.grad = p.grad.detach()  # shared, not copied: torch-pruning makes new tensors when it prunes, and reads these
    importance.bind(trial)
    names = dict(model.named_modules())
    trial_modules = dict(trial.named_modules())
    ignored_layers = [trial_modules[n] for n, m in names.items() if any(m is i for i in ignored)]
    ratio_dict = {trial_modules[n]: r for n, r in (overrides or {}).items()} or None
    with warnings.catch_warnings(), bounded("pruning a candidate", trial):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            trial,
            example_inputs,
            importance=importance,
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            max_pruning_ratio=max_layer_ratio,
            ignored_layers=ignored_layers,
            round_to=round_to,
            pruning_ratio_dict=ratio_dict,
        )
        if compensator is None:
            pruner.step()
        else:
            compensator.bind(trial)
            for group in pruner.step(interactive=True):
                compensator.before_prune(group, pruner.DG)
                group.prune()
    trial.zero_grad(set_to_none=True)  # the gradients served the scoring; a candidate kept by the search holds no copy
    return trial


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv (and output features of every linear layer), by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


class _GroupSparsity(tp.pruner.GroupNormPruner):
    """torch-pruning's group-norm regulariser; a group whose channels all score the same (one channel, or
    equal norms) is skipped, where the library's scaling would divide by zero."""

    def estimate_importance(self, group):
        imp = super().estimate_importance(group)
        if imp is not None and imp.numel() and float(imp.max() - imp.min()) <= 1e-12 * max(float(imp.max()), 1e-30):
            return torch.full_like(imp, float("nan"))  # the library skips a group whose scores are NaN
        return imp


def group_sparsity_regularizer(
    model: nn.Module, example_inputs: torch.Tensor, coefficient: float, *, ignored_layers=(), vectorised: bool = True,
) -> Callable[[], None]:
    """Pruning-aware (group sparse) training: a function to call after every backward pass that adds
    torch-pruning's group-norm regulariser to the gradients of ``model``.

    For every prunable channel group (a conv's filters with the batch-norm channels and the next layers'
    input channels that go with them) the gradient of each weight ``w`` gains ``coefficient * gamma * w``,
    where ``gamma = 16 ** ((max - s) / (max - min))`` over the L2 norms ``s`` of the group's channels
    (``tp.importance.GroupMagnitudeImportance(p=2)``): an extra weight decay, 1x on the strongest
    channel and 16x on the weakest, recomputed every step, so the channels pruning will remove are
    pushed toward zero before it removes them (GroupNormPruner; Fang et al., "DepGraph: Towards Any
    Structural Pruning", CVPR 2023).  The classifier's outputs and ``ignored_layers`` are left alone.
    Computed with a few batched tensor ops per step (:class:`~convsim_shrink.prune.sparsity.GroupNormRegularizer`),
    the same gradient as the library's per-group loop.

    ``example_inputs``: one batch the model accepts, ``(N, C, H, W)`` for image models (traced once, in
    eval mode, so batch-norm statistics are not touched).  ``coefficient`` in the units of weight decay
    (per step, times the learning rate).  ``vectorised=False``: the library's own per-group loop (slow;
    the tests' reference).  Raises :class:`ConfigError` if ``coefficient`` is not positive, and
    :class:`~convsim_shrink.prune.safety.GraphLimitError` when torch-pruning's groups pass the graph limits.
    """
    if not coefficient > 0:
        raise ConfigError(f"group sparsity coefficient must be positive, got {coefficient}")
    ignored = list(ignored_layers)
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    try:
        with evaluating(model), bounded("building the pruning-aware regulariser's channel groups", model):
            pruner = _GroupSparsity(  # traces with autograd on (the dependency graph needs it)
                model, example_inputs, tp.importance.GroupMagnitudeImportance(p=2), reg=coefficient,
                ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear],
            )
            vectorised_regularizer = GroupNormRegularizer(pruner) if vectorised else None
    except GraphLimitError as exc:
        raise GraphLimitError(f"{exc} (train.sparsity=0 trains without the regulariser)", exc.module, exc.limit) from None

    if vectorised_regularizer is not None:
        return vectorised_regularizer.regularize

    def regularize() -> None:
        pruner.regularize(model)

    return regularize
