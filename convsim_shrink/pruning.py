"""Structural pruning to a *measured* size with torch-pruning's dependency graph.

Torch-pruning's ratio is per channel (a 0.3 channel ratio leaves about half the parameters), so the
channel ratio is solved for by bisection, re-counting parameters (or MACs) with
``tp.utils.count_ops_and_params`` on a copy of the model each time, until the measured target holds:
at most ``target`` and within ``tolerance`` below it.  The same bisection solves a *latency* target by
timing every candidate (``deploy.latency_meter``), and several targets at once (each must hold; the
binding one lands in its window).  Importance scores are computed once per group and reused across the
bisection's trials.  The classifier's outputs are never pruned, and no layer loses more than
``max_layer_ratio`` of its channels.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
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


class _CachedImportance(tp.importance.Importance):
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


KINDS = ("params", "macs", "latency")
POOL = 3  # latency measurements of one channel allocation during the search (the winner gets 2 more)
_NAMES = {"params": "params", "macs": "MACs", "latency": "latency"}


@dataclass
class PruneResult:
    model: nn.Module
    base: Size
    pruned: Size
    channel_ratio: float
    trials: int
    history: list[dict] = field(default_factory=list)
    note: str | None = None  # set when a target had to land more than its tolerance below, or timings were unreliable
    base_latency: float | None = None  # seconds per batch of the base (dense) model: median of its measurements
    latency: float | None = None  # seconds per batch of the pruned model: median of its measurements
    latency_measurements: int = 0  # calls of the latency function
    latency_seconds: float = 0.0  # wall time spent in them
    plan: Any = None  # the pruneability.IgnorePlan the pruning honoured (iterative_prune with a plan)
    uncompensated: nn.Module | None = None  # with compensation: the same channels pruned without it
    compensation: Any = None  # with compensation: its compensation.CompensationReport

    @property
    def params_ratio(self) -> float:
        return self.pruned.params / self.base.params

    @property
    def macs_ratio(self) -> float:
        return self.pruned.macs / self.base.macs

    @property
    def latency_ratio(self) -> float | None:
        if self.latency is None or not self.base_latency:
            return None
        return self.latency / self.base_latency


@dataclass
class _Candidate:
    model: nn.Module
    size: Size
    fracs: dict[str, float]  # measured fraction of the base, per targeted kind (latency only when measured)
    ratio: float
    latencies: list[float] = field(default_factory=list)  # seconds, every measurement of this candidate
    args: dict = field(default_factory=dict)  # how _prune_copy made it (ratio, overrides, global): to remake it


class _Timer:
    """Calls the latency function, converting what it returns to seconds, and keeps count, wall time and
    the first spread warning of a :class:`~convsim_shrink.deploy.Latency`."""

    def __init__(self, fn: Callable[[nn.Module], Any]):
        self.fn, self.count, self.seconds, self.warning = fn, 0, 0.0, None

    def __call__(self, model: nn.Module) -> float:
        t0 = time.perf_counter()
        value = self.fn(model)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        if hasattr(value, "spread_warning"):
            self.warning = self.warning or value.spread_warning()
            value = value.seconds
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"the latency function returned {value}; it must return seconds per batch (> 0)")
        return value


def _signature(model: nn.Module) -> tuple:
    return tuple(channel_counts(model).values())


def _describe(fracs: dict[str, float], kinds) -> str:
    return ", ".join(f"{fracs[k]:.3f} of the {_NAMES[k]}" for k in kinds if k in fracs)


def _setting(name: str, value) -> str:
    return f"prune.{name}={'null' if value is None else value}"


def _unreachable(targets: dict[str, float], probes: list[_Candidate], max_layer_ratio: float, round_to,
                 alternative: tuple[dict, _Candidate] | None = None, tried: list[dict] = ()) -> TargetUnreachableError:
    """The refusal: what the allowed settings reach at most, and a setting that does reach the targets
    (``alternative``: the settings changed and the candidate they gave) or, when none of ``tried`` did,
    the targets that are reachable."""
    where = f"({_setting('max_layer_ratio', max_layer_ratio)}, {_setting('round_to', round_to)})"
    if alternative is not None:
        changed, c = alternative
        fix = (f"{' and '.join(_setting(k, v) for k, v in changed.items())} reaches it "
               f"(down to {_describe(c.fracs, targets)}), or raise the target")
    else:
        others = " or ".join(" and ".join(_setting(k, v) for k, v in t.items()) for t in tried)
        fix = f"{others} does not reach it either; raise the target" if others else "raise the target"
    if len(targets) == 1:
        ((kind, target),) = targets.items()
        smallest = min(c.fracs[kind] for c in probes)
        if alternative is None:
            fix += f" to at least {math.ceil(smallest * 1000) / 1000:g}"
        return TargetUnreachableError(
            f"target {_NAMES[kind]} {target:g} is unreachable: the smallest reachable is {smallest:.3f} of the {_NAMES[kind]} {where}; {fix}"
        )
    # the most pruned model that comes nearest to meeting every target, and the targets it does meet
    nearest = min(probes, key=lambda c: max(c.fracs[k] / t for k, t in targets.items()))
    closest = ", ".join(f"target_{k}={max(t, math.ceil(nearest.fracs[k] * 100) / 100):g}" for k, t in targets.items())
    asked = ", ".join(f"target_{k}={t:g}" for k, t in targets.items())
    return TargetUnreachableError(
        f"the targets {asked} are unreachable together: the most pruned model measures {_describe(nearest.fracs, targets)} "
        f"{where}; the closest reachable combination is {closest}; {fix}"
    )


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


def _prune_copy(model, example_inputs, importance, ratio, *, round_to, global_pruning, max_layer_ratio, ignored, overrides=None,
                compensator=None):
    """A pruned copy of ``model``; with a ``compensator``
    (:class:`~convsim_shrink.compensation.Compensator`), every group's consumers are compensated just before
    the group is removed."""
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
        if compensator is None:
            pruner.step()
        else:
            compensator.bind(trial)
            for group in pruner.step(interactive=True):
                compensator.before_prune(group, pruner.DG)
                group.prune()
    return trial


def prune_to_target(
    model: nn.Module,
    example_inputs: torch.Tensor,
    importance: tp.importance.Importance,
    *,
    target_params: float | None = None,
    target_macs: float | None = None,
    target_latency: float | None = None,
    latency_fn: Callable[[nn.Module], Any] | None = None,
    base: Size | None = None,
    base_latency: float | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
    max_layer_ratio: float = 0.9,
    tolerance: float = 0.01,
    latency_tolerance: float = 0.05,
    ignored_layers: list[nn.Module] | None = None,
    max_trials: int = 24,
    warn: bool = True,
    cost_exponent: float = 0.0,
    compensator: Any = None,
    base_channels: dict[str, int] | None = None,
) -> PruneResult:
    """A pruned copy of ``model`` that meets every given target, each a fraction of the base model:
    parameters (``target_params``), MACs (``target_macs``) and measured latency (``target_latency``).

    One bisection on the channel ratio solves them all: a candidate fits when every measured fraction is
    at most its target, and the search stops when the binding target (the one with the least room) is
    within its tolerance below it (``tolerance`` for params/MACs, ``latency_tolerance`` for latency, both
    absolute, in ratio). ``base`` (default: ``model``'s size) is what the fractions are of.

    Latency: ``latency_fn(model)`` returns seconds per batch (a float or a
    :class:`~convsim_shrink.deploy.Latency`, whose median and spread are used); the default times
    ``example_inputs`` with :func:`~convsim_shrink.deploy.latency_meter`. Every candidate that meets the
    params/MACs targets is measured in full (no per-layer model); the dense model is measured in the same
    process before the search (unless ``base_latency``, in seconds, is given). Timings are noisy, so a
    candidate's latency is the median of every measurement of its channel allocation (revisits measure
    again, up to ``POOL`` times), and the winner is re-measured twice more, alternating with the dense
    model; if it is then over the target, it counts as too big and the search continues at smaller sizes
    (twice at most). What still misses, and a wide spread of timings, is said in ``note``.

    ``cost_exponent`` > 0 divides every group's scores by the MACs one of its channels costs to that power
    (:func:`channel_costs`): with global pruning, channels are then compared by importance per unit of
    compute, which spends a MACs or latency target where compute is (0: scores as the criterion gives them).

    ``compensator`` (:class:`~convsim_shrink.compensation.Compensator`): the search runs as without it
    (compensation changes no size), then the winner is pruned once more from ``model`` with the same
    channels, every removed channel's consumers compensated; ``result.uncompensated`` keeps the plain one.

    ``max_layer_ratio``: no layer loses more than this fraction of its channels (of ``base_channels``,
    the layers' channels by name before an iterative pruning's first step; default: ``model``'s), with
    ``round_to`` too: a layer keeps at least :func:`layer_floors` channels, whole where no multiple of
    ``round_to`` fits. Where torch-pruning's own limit lets a layer lose more, the candidate is pruned
    again layer by layer with that layer at its floor.

    Raises :class:`ConfigError` for a target outside (0, 1) or none at all, and
    :class:`TargetUnreachableError` when no allowed model meets the targets (not even the smallest, every
    layer at its floor): the message gives that smallest size and, for combined targets, the closest
    reachable combination; then a setting that reaches the targets (``round_to`` off, ``max_layer_ratio``
    0.95 or 0.99), or that none of those does.
    """
    targets = {k: t for k, t in zip(KINDS, (target_params, target_macs, target_latency)) if t is not None}
    if not targets:
        raise ConfigError("give a pruning target: target_params, target_macs and/or target_latency")
    for kind, t in targets.items():
        if not 0 < t < 1:
            raise ConfigError(f"the {kind} target must be a fraction between 0 and 1 (exclusive), got {t:g}")
    tol = {"params": tolerance, "macs": tolerance, "latency": latency_tolerance}
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    base = base or measure(model, example_inputs)
    timer = None
    dense_latencies: list[float] = []
    if "latency" in targets:
        if latency_fn is None:
            from .deploy import latency_meter

            latency_fn = latency_meter(example_inputs)
        timer = _Timer(latency_fn)
        if base_latency is None:
            dense_latencies.append(timer(model))

    def base_lat() -> float:
        return base_latency if base_latency is not None else statistics.median(dense_latencies)

    ignored = list(ignored_layers or [])
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    cached = _CachedImportance(importance, channel_costs(model, example_inputs) if cost_exponent else None, cost_exponent)
    history: list[dict] = []
    trials = 0

    rejected: set[tuple] = set()  # channel counts whose latency failed its re-measurement

    def fits(c: _Candidate) -> bool:
        if rejected and _signature(c.model) in rejected:
            return False
        return all(k in c.fracs and c.fracs[k] <= t for k, t in targets.items())

    def room(c: _Candidate) -> float:
        """Room below the binding target, in units of its tolerance (<= 1: in the window)."""
        return min((t - c.fracs[k]) / tol[k] for k, t in targets.items())

    def in_window(c: _Candidate) -> bool:
        return fits(c) and room(c) <= 1

    def binding(c: _Candidate) -> str:
        return min(targets, key=lambda k: (targets[k] - c.fracs[k]) / tol[k])

    def evaluate(pruned: nn.Module, ratio: float, *, all_kinds: bool = False) -> _Candidate:
        size = measure(pruned, example_inputs)
        fracs = {"params": size.params / base.params, "macs": size.macs / base.macs}
        c = _Candidate(pruned, size, {k: v for k, v in fracs.items() if k in targets}, ratio)
        # latency only where it can decide: the cheap targets hold (or the caller wants every number)
        if timer is not None and (all_kinds or all(v <= targets[k] for k, v in c.fracs.items())):
            # Candidates with the same channel counts are the same model (the bisection and rounding revisit
            # them often): they share one list of measurements, measured anew up to POOL times, so that a
            # noisy reading is outvoted instead of deciding the search alone.
            c.latencies = pooled.setdefault(_signature(pruned), [])
            if len(c.latencies) < POOL:
                c.latencies.append(timer(pruned))
            c.fracs["latency"] = fracs["latency"] = statistics.median(c.latencies) / base_lat()
        history.append({"channel_ratio": ratio, **{f"{k}_ratio": v for k, v in fracs.items()}})
        return c

    here = channel_counts(model)
    roots: list[str] = []  # the groups' root layers, found when a trial first needs them

    def trial(ratio: float, overrides: dict[str, float] | None = None, *, use_global: bool = global_pruning, all_kinds: bool = False,
              limit: float = max_layer_ratio, rounding: int | None = round_to):
        nonlocal trials
        args = {"ratio": ratio, "overrides": overrides, "global_pruning": use_global}
        floors = layer_floors({n: (base_channels or here).get(n, c) for n, c in here.items()}, limit, rounding)
        for attempt in range(3):
            pruned = _prune_copy(
                model, example_inputs, cached, args["ratio"], round_to=rounding, global_pruning=args["global_pruning"],
                max_layer_ratio=limit, ignored=ignored, overrides=args["overrides"],
            )
            trials += 1
            # Torch-pruning can take more than the limit of a layer (see layer_floors): prune the copy again
            # layer by layer, giving each layer it over-pruned its fewest allowed channels.
            counts = channel_counts(pruned)
            if all(counts[n] >= min(f, here[n]) for n, f in floors.items() if n in counts):
                break
            roots[:] = roots or _group_roots(model, example_inputs, ignored)
            want = {r: max(counts[r], min(floors[r], here[r])) for r in roots}
            if attempt:
                # a repair that still fell short (channels that go in groups of several, e.g. grouped convs)
                want = {r: min(here[r], want[r] + max(0, floors[r] - counts[r])) for r in roots}
            args = {"ratio": 0.0, "overrides": {r: 1 - (want[r] + 0.5) / here[r] for r in roots}, "global_pruning": False}
        c = evaluate(pruned, ratio, all_kinds=all_kinds)
        c.args = args
        return c

    def result(c: _Candidate, note: str | None = None) -> PruneResult:
        lat = statistics.median(c.latencies) if c.latencies else None
        return PruneResult(
            c.model, base, c.size, c.ratio, trials, history, note,
            base_latency=base_lat() if timer is not None else None, latency=lat,
            latency_measurements=timer.count if timer else 0, latency_seconds=timer.seconds if timer else 0.0,
        )

    # the model as it is (the base itself, or an earlier step of iterative pruning)
    size = measure(model, example_inputs)
    current = _Candidate(model, size, {k: getattr(size, k) / getattr(base, k) for k in ("params", "macs") if k in targets}, 0.0)
    pooled: dict[tuple, list[float]] = {}  # latency measurements per channel-count signature
    if timer is not None:
        current.latencies = pooled[_signature(model)] = dense_latencies if base_latency is None else [timer(model)]
        current.fracs["latency"] = statistics.median(current.latencies) / base_lat()
    if fits(current):
        if in_window(current):
            current.model = copy.deepcopy(model)
            return result(current)
        raise TargetUnreachableError(
            f"the model is already at {_describe(current.fracs, targets)} of the base, below the target "
            + ", ".join(f"{_NAMES[k]} {t:g}" for k, t in targets.items())
        )

    # The upper end first. Where it misses, the smallest model the limit allows (every layer at its floor)
    # says whether anything can fit; if so, step down from the upper end: a layer whose kept channels
    # truncate (int(C * 0.1) = 0 for C <= 10 at 0.9) or round to zero, or that global ranking would empty,
    # is left whole, so the largest ratio is not always the smallest size.
    def smallest(limit: float, rounding: int | None) -> _Candidate:
        roots[:] = roots or _group_roots(model, example_inputs, ignored)
        floors = layer_floors({n: (base_channels or here).get(n, c) for n, c in here.items()}, limit, rounding)
        overrides = {r: 1 - (min(floors[r], here[r]) + 0.5) / here[r] for r in roots}
        c = trial(0.0, overrides, use_global=False, all_kinds=True, limit=limit, rounding=rounding)
        c.ratio = limit
        return c

    probes = [trial(max_layer_ratio, all_kinds=True)]
    found = probes[0] if fits(probes[0]) else None
    if found is None:
        probes.append(smallest(max_layer_ratio, round_to))
        if fits(probes[-1]):
            hi_ratio = round(max_layer_ratio - 0.1, 6)
            while found is None and hi_ratio > 0.05:
                probes.append(trial(hi_ratio, all_kinds=True))
                found = probes[-1] if fits(probes[-1]) else None
                hi_ratio = round(hi_ratio - 0.1, 6)
            found = found or probes[1]
    if found is None:
        # a refusal names a setting that reaches the targets, if one of these does
        tried = ([{"round_to": None}] if round_to else []) + [{"max_layer_ratio": m} for m in (0.95, 0.99) if m > max_layer_ratio]
        for changed in tried:
            c = smallest(changed.get("max_layer_ratio", max_layer_ratio), changed.get("round_to", round_to))
            if fits(c):
                raise _unreachable(targets, probes, max_layer_ratio, round_to, alternative=(changed, c))
        raise _unreachable(targets, probes, max_layer_ratio, round_to, tried=tried)

    def bisect(lo: float, hi: float, best: _Candidate, budget: int) -> tuple[float, float, _Candidate]:
        """The smallest channel ratio whose candidate fits, until the binding target is in its window."""
        while trials < budget and not in_window(best):
            mid = 0.5 * (lo + hi)
            c = trial(mid)
            if fits(c):
                hi, best = mid, c
            else:
                lo = mid
            if hi - lo < 1e-4:
                break
        return lo, hi, best

    def refine(lo: float, hi: float, best: _Candidate) -> _Candidate:
        if in_window(best):
            return best
        if not global_pruning:
            # Every group steps at once under a uniform ratio, so the size can jump over the window. Refine:
            # the groups take the larger ratio one at a time (deepest first), bisecting on how many do.
            roots = list(reversed(_group_roots(model, example_inputs, ignored)))
            lo_k, hi_k = 0, len(roots)
            while hi_k - lo_k > 1 and trials < max_trials + 12:
                k = (lo_k + hi_k) // 2
                c = trial(lo, {name: hi for name in roots[:k]})
                if fits(c):
                    hi_k = k
                    if room(c) < room(best):
                        c.ratio, best = hi, c
                    if in_window(c):
                        break
                else:
                    lo_k = k
            return best
        if binding(best) == "latency":
            return best  # one group's round_to channels move the latency by less than its noise
        # One more kept channel (or round_to of them) in a large, residual-coupled group can move the size
        # by a few percent at once. Refine: start from the allocation that fits and give channels back,
        # round_to at a time, to the most-pruned groups first while the targets still hold.
        roots = _group_roots(model, example_inputs, ignored)
        full = channel_counts(model)
        counts_now = channel_counts(best.model)
        kept = {r: counts_now[r] for r in roots}
        step = round_to or 1

        def local_ratios(counts):
            return {r: 1 - (counts[r] + 0.5) / full[r] for r in roots}

        while not in_window(best) and trials < max_trials + 48:
            order = sorted((r for r in roots if kept[r] + step <= full[r]), key=lambda r: kept[r] / full[r])
            for r in order:
                counts = {**kept, r: kept[r] + step}
                c = trial(0.0, local_ratios(counts), use_global=False)
                if fits(c):
                    kept, c.ratio, best = counts, best.ratio, c
                    break
            else:
                break  # no group can take channels back without overshooting
        return best

    lo_ratio, hi_ratio, best = bisect(0.0, found.ratio, found, max_trials)
    best = refine(lo_ratio, hi_ratio, best)
    notes = []
    retries = 0
    while timer is not None:
        # re-measure the winner (alternating with the dense model, so drift hits both) before trusting it
        for _ in range(2):
            if base_latency is None:
                dense_latencies.append(timer(model))
            best.latencies.append(timer(best.model))
        best.fracs["latency"] = statistics.median(best.latencies) / base_lat()
        if best.fracs["latency"] <= targets["latency"]:
            break
        if retries == 2:
            notes.append(
                f"the pruned model's latency re-measured at {best.fracs['latency']:.3f} of the dense model's, above the "
                f"target {targets['latency']:g}: the timings vary more than the search can resolve"
            )
            break
        retries += 1
        # it was under the target by chance: count it (and any path to the same channel counts) as too big,
        # and search the sizes below it
        rejected.add(_signature(best.model))
        lo_ratio = max(lo_ratio, best.ratio)
        lo_ratio, hi_ratio, best = bisect(lo_ratio, found.ratio, found, trials + 6)
        best = refine(lo_ratio, hi_ratio, best)
    if fits(best) and not in_window(best):
        k = binding(best)
        notes.append(
            f"pruned to {best.fracs[k]:.4f} of the base {_NAMES[k]}: the nearest channel count below {targets[k]:g} "
            f"(round_to={round_to}) is more than {tol[k]} below the target"
        )
    if timer is not None and timer.warning:
        notes.append(timer.warning)
    note = "; ".join(notes) or None
    if note and warn:
        warnings.warn(note, stacklevel=2)
    out = result(best, note)
    if compensator is not None:
        out.uncompensated = best.model
        out.model = _prune_copy(
            model, example_inputs, cached, best.args["ratio"], round_to=round_to, global_pruning=best.args["global_pruning"],
            max_layer_ratio=max_layer_ratio, ignored=ignored, overrides=best.args["overrides"], compensator=compensator,
        )
        if _signature(out.model) != _signature(best.model):
            raise RuntimeError("compensated pruning kept other channels than the search's winner")  # a bug, not the user's
        out.compensation = compensator.report
    return out


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
    target_latency: float | None = None,
    latency_fn: Callable[[nn.Module], Any] | None = None,
    plan=None,
    make_compensator: Callable[[nn.Module], Any] | None = None,
    base_latency: float | None = None,
    **kwargs,
) -> PruneResult:
    """Prune in ``steps`` stages to intermediate targets (linear in the kept fraction, for every given
    target), calling ``between(model, step)`` (e.g. fine-tuning) after every stage but the last.
    ``before_scoring`` runs before each stage's scoring (e.g. to accumulate gradients for Taylor importance).
    ``make_compensator(model)`` (after ``before_scoring``) gives each stage's
    :class:`~convsim_shrink.compensation.Compensator`, fitted on that stage's model.
    With a latency target and several steps, the dense model's latency (median of 3 measurements) is the
    base of every stage (``base_latency``, seconds per batch, when the caller measured it already, also with
    one step). Other keyword arguments go to :func:`prune_to_target`.

    ``plan``: an :class:`~convsim_shrink.pruneability.IgnorePlan` of the layers to leave alone; every
    stage then runs through :func:`~convsim_shrink.pruneability.prune_safely` (the plan rebound to that
    stage's model, the pruned model verified, torch-pruning's errors turned into one-line
    :class:`~convsim_shrink.pruneability.PruningError`), and ``result.plan`` is the plan used last."""
    targets = {k: t for k, t in zip(KINDS, (target_params, target_macs, target_latency)) if t is not None}
    x = example_inputs.to(next(model.parameters()).device)
    base = measure(model, x)
    kwargs.setdefault("base_channels", channel_counts(model))  # max_layer_ratio holds over all the steps together
    if target_latency is not None and latency_fn is None:
        from .deploy import latency_meter

        latency_fn = latency_meter(x)
    if target_latency is not None and steps > 1 and base_latency is None:
        timer = _Timer(latency_fn)
        base_latency = statistics.median(timer(model) for _ in range(3))
    result = None
    for step in range(1, steps + 1):
        stage = {f"target_{k}": 1 - (1 - t) * step / steps for k, t in targets.items()}
        if before_scoring is not None:
            before_scoring(model)
        prune = functools.partial(
            prune_to_target, model, example_inputs, make_importance(), base=base, base_latency=base_latency, latency_fn=latency_fn,
            compensator=make_compensator(model) if make_compensator is not None else None, **stage, **kwargs,
        )
        if plan is None:
            result = prune()
        else:
            from .pruneability import prune_safely

            result, plan = prune_safely(model, x, prune, plan=plan.for_model(model))
            result.plan = plan
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


class _GroupSparsity(tp.pruner.GroupNormPruner):
    """torch-pruning's group-norm regulariser; a group whose channels all score the same (one channel, or
    equal norms) is skipped, where the library's scaling would divide by zero."""

    def estimate_importance(self, group):
        imp = super().estimate_importance(group)
        if imp is not None and imp.numel() and float(imp.max() - imp.min()) <= 1e-12 * max(float(imp.max()), 1e-30):
            return torch.full_like(imp, float("nan"))  # the library skips a group whose scores are NaN
        return imp


def group_sparsity_regularizer(
    model: nn.Module, example_inputs: torch.Tensor, coefficient: float, *, ignored_layers=(),
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

    ``example_inputs``: one batch the model accepts, ``(N, C, H, W)`` for image models (traced once, in
    eval mode, so batch-norm statistics are not touched).  ``coefficient`` in the units of weight decay
    (per step, times the learning rate).  Raises :class:`ConfigError` if ``coefficient`` is not positive.
    """
    if not coefficient > 0:
        raise ConfigError(f"group sparsity coefficient must be positive, got {coefficient}")
    ignored = list(ignored_layers)
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    was_training = model.training
    model.eval()
    try:
        pruner = _GroupSparsity(  # traces with autograd on (the dependency graph needs it)
            model, example_inputs, tp.importance.GroupMagnitudeImportance(p=2), reg=coefficient,
            ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear],
        )
    finally:
        model.train(was_training)

    def regularize() -> None:
        pruner.regularize(model)

    return regularize
