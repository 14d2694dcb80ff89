"""Structural pruning to a *measured* size with torch-pruning's dependency graph.

Torch-pruning's ratio is per channel (a 0.3 channel ratio leaves about half the parameters), so the
channel ratio is solved for by bisection, re-counting parameters (or MACs) with
``tp.utils.count_ops_and_params`` on a copy of the model each time, until the measured target holds:
at most ``target`` and within ``tolerance`` below it.  Importance scores are computed once per group
and reused across the bisection's trials.  The classifier's outputs are never pruned, and no layer
loses more than ``max_layer_ratio`` of its channels.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .errors import ConfigError, TargetUnreachableError
from .models import classifier_of


@dataclass
class Size:
    params: int
    macs: int


def measure(model: nn.Module, example_inputs: torch.Tensor) -> Size:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was_training)
    return Size(int(params), int(macs))


class _CachedImportance(tp.importance.Importance):
    """Scores a group once and reuses them for identical groups of other copies of the same model."""

    def __init__(self, base: tp.importance.Importance):
        self.base = base
        self.cache: dict[tuple, torch.Tensor | None] = {}
        self.names: dict[int, str] = {}

    def bind(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}

    def __call__(self, group):
        key = tuple(
            (self.names.get(id(dep.layer), "?"), dep.pruning_fn.__name__, len(idxs)) for dep, idxs in group
        )
        if key not in self.cache:
            scores = self.base(group)
            self.cache[key] = None if scores is None else scores.detach().clone()
        cached = self.cache[key]
        return None if cached is None else cached.clone()


@dataclass
class PruneResult:
    model: nn.Module
    base: Size
    pruned: Size
    channel_ratio: float
    trials: int
    history: list[dict] = field(default_factory=list)
    note: str | None = None  # set when the size had to land more than the tolerance below the target

    @property
    def params_ratio(self) -> float:
        return self.pruned.params / self.base.params

    @property
    def macs_ratio(self) -> float:
        return self.pruned.macs / self.base.macs


def _group_roots(model, example_inputs, ignored) -> list[str]:
    """Names of the root modules of the model's prunable groups, in network order."""
    names = {id(m): n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    roots = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
        name = names.get(id(group[0].dep.target.module))
        if name is not None and name not in roots:
            roots.append(name)
    return roots


def _prune_copy(model, example_inputs, importance, ratio, *, round_to, global_pruning, max_layer_ratio, ignored, overrides=None):
    trial = copy.deepcopy(model)
    for p, q in zip(model.parameters(), trial.parameters()):  # deepcopy drops .grad; Taylor needs it
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    importance.bind(trial)
    names = dict(model.named_modules())
    trial_modules = dict(trial.named_modules())
    ignored_layers = [trial_modules[n] for n, m in names.items() if any(m is i for i in ignored)]
    ratio_dict = {trial_modules[n]: r for n, r in (overrides or {}).items()} or None
    with warnings.catch_warnings():
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
        pruner.step()
    return trial


def prune_to_target(
    model: nn.Module,
    example_inputs: torch.Tensor,
    importance: tp.importance.Importance,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    base: Size | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
    max_layer_ratio: float = 0.9,
    tolerance: float = 0.01,
    ignored_layers: list[nn.Module] | None = None,
    max_trials: int = 24,
    warn: bool = True,
) -> PruneResult:
    """A pruned copy of ``model`` whose parameter (or MAC) count is at most ``target`` × the count of
    ``base`` (default: ``model`` itself) and within ``tolerance`` (absolute, in ratio) below it.

    Raises :class:`TargetUnreachableError` when even the largest allowed channel ratio stays above the
    target, with the smallest size that is reachable.
    """
    if (target_params is None) == (target_macs is None):
        raise ConfigError("give exactly one of target_params and target_macs")
    target = target_params if target_params is not None else target_macs
    if not 0 < target < 1:
        raise ConfigError(f"the target must be a fraction between 0 and 1 (exclusive), got {target}")
    kind = "params" if target_params is not None else "macs"
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    base = base or measure(model, example_inputs)
    base_value = getattr(base, kind)
    ignored = list(ignored_layers or [])
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    cached = _CachedImportance(importance)
    history: list[dict] = []

    def trial(ratio: float, overrides: dict[str, float] | None = None, use_global: bool = global_pruning):
        pruned = _prune_copy(
            model, example_inputs, cached, ratio, round_to=round_to, global_pruning=use_global,
            max_layer_ratio=max_layer_ratio, ignored=ignored, overrides=overrides,
        )
        size = measure(pruned, example_inputs)
        frac = getattr(size, kind) / base_value
        history.append({"channel_ratio": ratio, f"{kind}_ratio": frac})
        return pruned, size, frac

    current = getattr(measure(model, example_inputs), kind) / base_value
    if current <= target:
        if current >= target - tolerance:
            return PruneResult(copy.deepcopy(model), base, measure(model, example_inputs), 0.0, 0, history)
        raise TargetUnreachableError(f"the model is already at {current:.3f} of the base {kind}, below the target {target}")

    # bisection on the channel ratio: find the smallest ratio whose measured size is <= target.
    # The upper end first: with rounding, a layer whose kept channels would round to zero is left whole,
    # so the largest ratio is not always the smallest size; step down until the target holds.
    trials = 0
    smallest = float("inf")
    found = None
    hi_ratio = max_layer_ratio
    while hi_ratio > 0.05:
        pruned, size, frac = trial(hi_ratio)
        trials += 1
        smallest = min(smallest, frac)
        if frac <= target:
            found = (pruned, size, frac, hi_ratio)
            break
        if round_to is None:
            break  # without rounding the size falls monotonically with the ratio
        hi_ratio = round(hi_ratio - 0.1, 6)
    if found is None:
        raise TargetUnreachableError(
            f"target {kind} {target} is unreachable: the smallest reachable is {smallest:.3f} of the {kind} "
            f"(prune.max_layer_ratio={max_layer_ratio}, round_to={round_to}); raise prune.max_layer_ratio, "
            "lower round_to, or raise the target"
        )
    best = found
    lo_ratio = 0.0
    while trials < max_trials and best[2] < target - tolerance:
        mid = 0.5 * (lo_ratio + hi_ratio)
        pruned, size, frac = trial(mid)
        trials += 1
        if frac <= target:
            hi_ratio = mid
            best = (pruned, size, frac, mid)
        else:
            lo_ratio = mid
        if hi_ratio - lo_ratio < 1e-4:
            break
    if best[2] < target - tolerance and not global_pruning:
        # Every group steps at once under a uniform ratio, so the size can jump over the window. Refine:
        # the groups take the larger ratio one at a time (deepest first), bisecting on how many do.
        roots = list(reversed(_group_roots(model, example_inputs, ignored)))
        lo_k, hi_k = 0, len(roots)
        while hi_k - lo_k > 1 and trials < max_trials + 12:
            k = (lo_k + hi_k) // 2
            pruned, size, frac = trial(lo_ratio, {name: hi_ratio for name in roots[:k]})
            trials += 1
            if frac <= target:
                hi_k = k
                if frac > best[2]:
                    best = (pruned, size, frac, hi_ratio)
                if frac >= target - tolerance:
                    break
            else:
                lo_k = k
    if best[2] < target - tolerance and global_pruning:
        # One more kept channel (or round_to of them) in a large, residual-coupled group can move the size
        # by a few percent at once. Refine: start from the allocation that fits and give channels back,
        # round_to at a time, to the most-pruned groups first while the target still holds.
        roots = _group_roots(model, example_inputs, ignored)
        full = channel_counts(model)
        counts_now = channel_counts(best[0])
        kept = {r: counts_now[r] for r in roots}
        step = round_to or 1

        def local_ratios(counts):
            return {r: 1 - (counts[r] + 0.5) / full[r] for r in roots}

        while best[2] < target - tolerance and trials < max_trials + 48:
            order = sorted((r for r in roots if kept[r] + step <= full[r]), key=lambda r: kept[r] / full[r])
            for r in order:
                counts = {**kept, r: kept[r] + step}
                pruned, size, frac = trial(0.0, local_ratios(counts), use_global=False)
                trials += 1
                if frac <= target:
                    kept = counts
                    best = (pruned, size, frac, best[3])
                    break
            else:
                break  # no group can take channels back without overshooting
    pruned, size, frac, ratio = best
    note = None
    if frac < target - tolerance:
        note = (
            f"pruned to {frac:.4f} of the base {kind}: the nearest channel count below {target} (round_to={round_to}) "
            f"is more than {tolerance} below the target"
        )
        if warn:
            warnings.warn(note, stacklevel=2)
    return PruneResult(pruned, base, size, ratio, trials, history, note)


def iterative_prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    make_importance: Callable[[], tp.importance.Importance],
    *,
    steps: int,
    between: Callable[[nn.Module, int], None] | None = None,
    before_scoring: Callable[[nn.Module], None] | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    **kwargs,
) -> PruneResult:
    """Prune in ``steps`` stages to intermediate targets (linear in the kept fraction), calling
    ``between(model, step)`` (e.g. fine-tuning) after every stage but the last.  ``before_scoring``
    runs before each stage's scoring (e.g. to accumulate gradients for Taylor importance)."""
    target = target_params if target_params is not None else target_macs
    key = "target_params" if target_params is not None else "target_macs"
    base = measure(model, example_inputs.to(next(model.parameters()).device))
    result = None
    for step in range(1, steps + 1):
        stage_target = 1 - (1 - target) * step / steps
        if before_scoring is not None:
            before_scoring(model)
        result = prune_to_target(model, example_inputs, make_importance(), base=base, **{key: stage_target}, **kwargs)
        model = result.model
        if between is not None and step < steps:
            between(model, step)
    assert result is not None
    return result


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv (and output features of every linear layer), by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out
