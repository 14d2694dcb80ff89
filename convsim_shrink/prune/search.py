"""The target search: a pruned copy of a model at a *measured* size, parameters, MACs and/or latency.

Torch-pruning's ratio is per channel (a 0.3 channel ratio leaves about half the parameters), so the
channel ratio is solved for, re-counting parameters (or MACs) with ``tp.utils.count_ops_and_params`` on
a pruned copy each time, until the measured target holds: at most ``target`` and within its tolerance
below it.  A *latency* target is solved the same way by timing every candidate
(:func:`~convsim_shrink.measure.latency.latency_meter`), and several targets at once (each must hold;
the binding one lands in its window).

The search is a few steps over one :class:`SearchState` (the settings, the model, what was measured):

* :func:`probe`: the largest channel ratio the limits allow, else the smallest model they allow, else
  a refusal naming a setting that would reach the targets;
* :func:`bisect`: bisection on the channel ratio until the binding target is in its window;
* :func:`refine`: when one ratio step jumps over the window, :func:`refine_uniform` (per-layer pruning:
  the groups take the larger ratio one at a time) or :func:`refine_global` (global pruning: channels
  given back to the most pruned groups);
* :func:`confirm_latency`: the winner re-measured beside the dense model; a winner that was under a
  latency target by chance counts as too big and the search goes on below it.

:func:`prune_to_target` runs them in that order; :func:`iterative_prune` runs it in steps.  Every
step reaches the model only through ``state.trial`` (prune a copy and measure it), so each can be
tested with a fake.
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

from ..errors import ConfigError, TargetUnreachableError
from ..measure.latency import latency_meter
from ..models import classifier_of
from .memory import release_memory
from .pruning import (
    CachedImportance,
    Size,
    channel_costs,
    channel_counts,
    group_roots,
    layer_floors,
    measure,
    prune_copy,
)
from .safety import prune_safely

KINDS = ("params", "macs", "latency")
POOL = 3  # latency measurements of one channel allocation during the search (the winner gets 2 more)
NAMES = {"params": "params", "macs": "MACs", "latency": "latency"}


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
class Candidate:
    """One pruned copy the search measured (``model`` is None once the search has no more use for it: a
    probe that missed keeps only its measurements, so a large model's search holds a few copies, not one
    per probe)."""

    model: nn.Module | None
    size: Size
    fracs: dict[str, float]  # measured fraction of the base, per targeted kind (latency only when measured)
    ratio: float
    latencies: list[float] = field(default_factory=list)  # seconds, every measurement of this candidate
    args: dict = field(default_factory=dict)  # how prune_copy made it (ratio, overrides, global): to remake it


class LatencyTimer:
    """Calls the latency function, converting what it returns to seconds, and keeps count, wall time and
    the first spread warning of a :class:`~convsim_shrink.measure.latency.Latency`."""

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


def signature(model: nn.Module) -> tuple:
    """A model's channel counts: candidates with the same signature are the same architecture."""
    return tuple(channel_counts(model).values())


def describe(fracs: dict[str, float], kinds) -> str:
    return ", ".join(f"{fracs[k]:.3f} of the {NAMES[k]}" for k in kinds if k in fracs)


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SearchSettings:
    """What the search aims at and the limits it keeps (see :func:`prune_to_target` for each)."""

    targets: dict[str, float]  # kind -> fraction of the base, for the kinds asked for (in KINDS order)
    tolerances: dict[str, float]  # kind -> absolute tolerance below the target, in ratio
    round_to: int | None = None
    global_pruning: bool = False
    max_layer_ratio: float = 0.9
    max_trials: int = 24

    @classmethod
    def of(cls, *, target_params: float | None = None, target_macs: float | None = None, target_latency: float | None = None,
           tolerance: float = 0.01, latency_tolerance: float = 0.05, **limits) -> SearchSettings:
        """Settings for the given targets; raises :class:`ConfigError` for none, or one outside (0, 1)."""
        targets = {k: t for k, t in zip(KINDS, (target_params, target_macs, target_latency)) if t is not None}
        if not targets:
            raise ConfigError("give a pruning target: target_params, target_macs and/or target_latency")
        for kind, t in targets.items():
            if not 0 < t < 1:
                raise ConfigError(f"the {kind} target must be a fraction between 0 and 1 (exclusive), got {t:g}")
        return cls(targets, {"params": tolerance, "macs": tolerance, "latency": latency_tolerance}, **limits)

    def fits_fracs(self, fracs: dict[str, float]) -> bool:
        """Every target is measured and held."""
        return all(k in fracs and fracs[k] <= t for k, t in self.targets.items())

    def room(self, fracs: dict[str, float]) -> float:
        """Room below the binding target, in units of its tolerance (<= 1: in the window)."""
        return min((t - fracs[k]) / self.tolerances[k] for k, t in self.targets.items())

    def binding(self, fracs: dict[str, float]) -> str:
        """The target with the least room."""
        return min(self.targets, key=lambda k: (self.targets[k] - fracs[k]) / self.tolerances[k])


# --------------------------------------------------------------------------------------------- state


@dataclass
class SearchState:
    """The search's settings and what it has measured so far.  ``trial`` (prune a copy at a channel
    ratio, or with per-layer ``overrides``, and measure it) is the one way the steps reach the model."""

    settings: SearchSettings
    model: nn.Module
    example_inputs: torch.Tensor
    base: Size
    importance: tp.importance.Importance
    ignored: list[nn.Module]
    here: dict[str, int]  # the model's channels by layer
    base_channels: dict[str, int] | None = None  # the layers' channels before an iterative pruning's first step
    timer: LatencyTimer | None = None
    base_latency: float | None = None  # given: seconds per batch of the base model
    dense_latencies: list[float] = field(default_factory=list)  # the dense model's measurements (no base_latency)
    trials: int = 0
    history: list[dict] = field(default_factory=list)
    rejected: set[tuple] = field(default_factory=set)  # channel counts whose latency failed its re-measurement
    pooled: dict[tuple, list[float]] = field(default_factory=dict)  # latency measurements per channel-count signature
    roots: list[str] = field(default_factory=list)  # the groups' root layers, found when a trial first needs them
    budget_spent: bool = False  # a refinement ended on its trial budget, not on the channel counts

    # ------------------------------------------------------------------------------- judging

    def base_lat(self) -> float:
        return self.base_latency if self.base_latency is not None else statistics.median(self.dense_latencies)

    def fits(self, c: Candidate) -> bool:
        if self.rejected and signature(c.model) in self.rejected:
            return False
        return self.settings.fits_fracs(c.fracs)

    def room(self, c: Candidate) -> float:
        return self.settings.room(c.fracs)

    def in_window(self, c: Candidate) -> bool:
        return self.fits(c) and self.room(c) <= 1

    def binding(self, c: Candidate) -> str:
        return self.settings.binding(c.fracs)

    # ------------------------------------------------------------------------------ measuring

    def group_roots(self) -> list[str]:
        """Names of the root layers of the model's prunable groups, in network order (traced anew)."""
        return group_roots(self.model, self.example_inputs, self.ignored)

    def evaluate(self, pruned: nn.Module, ratio: float, *, all_kinds: bool = False) -> Candidate:
        """Measure ``pruned``: its size always, its latency where it can decide (the cheap targets hold,
        or ``all_kinds``)."""
        targets = self.settings.targets
        size = measure(pruned, self.example_inputs)
        fracs = {"params": size.params / self.base.params, "macs": size.macs / self.base.macs}
        c = Candidate(pruned, size, {k: v for k, v in fracs.items() if k in targets}, ratio)
        if self.timer is not None and (all_kinds or all(v <= targets[k] for k, v in c.fracs.items())):
            # Candidates with the same channel counts are the same model (the bisection and rounding revisit
            # them often): they share one list of measurements, measured anew up to POOL times, so that a
            # noisy reading is outvoted instead of deciding the search alone.
            c.latencies = self.pooled.setdefault(signature(pruned), [])
            if len(c.latencies) < POOL:
                c.latencies.append(self.timer(pruned))
            c.fracs["latency"] = fracs["latency"] = statistics.median(c.latencies) / self.base_lat()
        self.history.append({"channel_ratio": ratio, **{f"{k}_ratio": v for k, v in fracs.items()}})
        return c

    def trial(self, ratio: float, overrides: dict[str, float] | None = None, *, use_global: bool | None = None,
              all_kinds: bool = False, limit: float | None = None, rounding: int | None | bool = False) -> Candidate:
        """A pruned copy at channel ratio ``ratio`` (or with per-layer ``overrides``), measured.  ``use_global``,
        ``limit`` and ``rounding`` default to the settings' global pruning, max_layer_ratio and round_to.

        Torch-pruning can take more than the limit of a layer (see :func:`~.pruning.layer_floors`): the
        copy is then pruned again layer by layer, each layer it over-pruned at its fewest allowed channels."""
        s = self.settings
        use_global = s.global_pruning if use_global is None else use_global
        limit = s.max_layer_ratio if limit is None else limit
        rounding = s.round_to if rounding is False else rounding
        here = self.here
        args = {"ratio": ratio, "overrides": overrides, "global_pruning": use_global}
        floors = layer_floors({n: (self.base_channels or here).get(n, c) for n, c in here.items()}, limit, rounding)
        for attempt in range(3):
            pruned = prune_copy(
                self.model, self.example_inputs, self.importance, args["ratio"], round_to=rounding,
                global_pruning=args["global_pruning"], max_layer_ratio=limit, ignored=self.ignored, overrides=args["overrides"],
            )
            self.trials += 1
            counts = channel_counts(pruned)
            if all(counts[n] >= min(f, here[n]) for n, f in floors.items() if n in counts):
                break
            self.roots[:] = self.roots or self.group_roots()
            want = {r: max(counts[r], min(floors[r], here[r])) for r in self.roots}
            if attempt:
                # a repair that still fell short (channels that go in groups of several, e.g. grouped convs)
                want = {r: min(here[r], want[r] + max(0, floors[r] - counts[r])) for r in self.roots}
            args = {"ratio": 0.0, "overrides": {r: 1 - (want[r] + 0.5) / here[r] for r in self.roots}, "global_pruning": False}
        c = self.evaluate(pruned, ratio, all_kinds=all_kinds)
        c.args = args
        return c

    def smallest(self, limit: float, rounding: int | None) -> Candidate:
        """The smallest model ``limit`` and ``rounding`` allow: every layer at its floor."""
        self.roots[:] = self.roots or self.group_roots()
        here = self.here
        floors = layer_floors({n: (self.base_channels or here).get(n, c) for n, c in here.items()}, limit, rounding)
        overrides = {r: 1 - (min(floors[r], here[r]) + 0.5) / here[r] for r in self.roots}
        c = self.trial(0.0, overrides, use_global=False, all_kinds=True, limit=limit, rounding=rounding)
        c.ratio = limit
        return c

    def result(self, c: Candidate, note: str | None = None) -> PruneResult:
        lat = statistics.median(c.latencies) if c.latencies else None
        timer = self.timer
        return PruneResult(
            c.model, self.base, c.size, c.ratio, self.trials, self.history, note,
            base_latency=self.base_lat() if timer is not None else None, latency=lat,
            latency_measurements=timer.count if timer else 0, latency_seconds=timer.seconds if timer else 0.0,
        )


# --------------------------------------------------------------------------------------------- steps


def _setting(name: str, value) -> str:
    return f"prune.{name}={'null' if value is None else value}"


def unreachable(targets: dict[str, float], probes: list[Candidate], max_layer_ratio: float, round_to,
                 alternative: tuple[dict, Candidate] | None = None, tried: list[dict] = ()) -> TargetUnreachableError:
    """The refusal (a :class:`TargetUnreachableError`): what the allowed settings reach at most, and a setting that does reach the targets
    (``alternative``: the settings changed and the candidate they gave) or, when none of ``tried`` did,
    the targets that are reachable."""
    where = f"({_setting('max_layer_ratio', max_layer_ratio)}, {_setting('round_to', round_to)})"
    if alternative is not None:
        changed, c = alternative
        fix = (f"{' and '.join(_setting(k, v) for k, v in changed.items())} reaches it "
               f"(down to {describe(c.fracs, targets)}), or raise the target")
    else:
        others = " or ".join(" and ".join(_setting(k, v) for k, v in t.items()) for t in tried)
        fix = f"{others} does not reach it either; raise the target" if others else "raise the target"
    if len(targets) == 1:
        ((kind, target),) = targets.items()
        smallest = min(c.fracs[kind] for c in probes)
        if alternative is None:
            fix += f" to at least {math.ceil(smallest * 1000) / 1000:g}"
        return TargetUnreachableError(
            f"target {NAMES[kind]} {target:g} is unreachable: the smallest reachable is {smallest:.3f} of the {NAMES[kind]} {where}; {fix}"
        )
    # the most pruned model that comes nearest to meeting every target, and the targets it does meet
    nearest = min(probes, key=lambda c: max(c.fracs[k] / t for k, t in targets.items()))
    closest = ", ".join(f"target_{k}={max(t, math.ceil(nearest.fracs[k] * 100) / 100):g}" for k, t in targets.items())
    asked = ", ".join(f"target_{k}={t:g}" for k, t in targets.items())
    return TargetUnreachableError(
        f"the targets {asked} are unreachable together: the most pruned model measures {describe(nearest.fracs, targets)} "
        f"{where}; the closest reachable combination is {closest}; {fix}"
    )


def probe(state: SearchState) -> Candidate:
    """The first candidate that fits, or the refusal.

    The upper end first (``max_layer_ratio``).  Where it misses, the smallest model the limit allows (every
    layer at its floor) says whether anything can fit; if so, step down from the upper end by 0.1: a layer
    whose kept channels truncate (int(C * 0.1) = 0 for C <= 10 at 0.9) or round to zero, or that global
    ranking would empty, is left whole, so the largest ratio is not always the smallest size.  When
    nothing fits, raises :class:`TargetUnreachableError` naming a setting that reaches the targets
    (``round_to`` off, ``max_layer_ratio`` 0.95 or 0.99) if one does.
    """
    s = state.settings
    probes: list[Candidate] = []

    def measured(c: Candidate) -> Candidate:
        probes.append(c)
        if not state.fits(c):
            c.model = None  # only its measurements are needed (the refusal); a copy of a 300 M model is GBs
        return c

    found = measured(state.trial(s.max_layer_ratio, all_kinds=True))
    found = found if found.model is not None else None
    if found is None:
        smallest = measured(state.smallest(s.max_layer_ratio, s.round_to))
        if smallest.model is not None:
            hi_ratio = round(s.max_layer_ratio - 0.1, 6)
            while found is None and hi_ratio > 0.05:
                c = measured(state.trial(hi_ratio, all_kinds=True))
                found = c if c.model is not None else None
                hi_ratio = round(hi_ratio - 0.1, 6)
            found = found or smallest
            if found is not smallest:
                smallest.model = None
    if found is None:
        tried = ([{"round_to": None}] if s.round_to else []) + [{"max_layer_ratio": m} for m in (0.95, 0.99) if m > s.max_layer_ratio]
        for changed in tried:
            c = state.smallest(changed.get("max_layer_ratio", s.max_layer_ratio), changed.get("round_to", s.round_to))
            if state.fits(c):
                raise unreachable(s.targets, probes, s.max_layer_ratio, s.round_to, alternative=(changed, c))
        raise unreachable(s.targets, probes, s.max_layer_ratio, s.round_to, tried=tried)
    return found


def bisect(state: SearchState, lo: float, hi: float, best: Candidate, budget: int,
           lo_fracs: dict[str, float] | None = None) -> tuple[float, float, Candidate]:
    """The smallest channel ratio in (``lo``, ``hi``] whose candidate fits, bisecting until the binding
    target is in its window, ``state.trials`` reaches ``budget`` or the interval is below 1e-4.
    ``best`` fits at ``hi``.  Returns the final ``(lo, hi, best)``.

    With ``lo_fracs`` (the measured fractions at ``lo``) and a parameters or MACs target binding, each
    step is an interpolation instead of the midpoint: both counts fall about as the square of the kept
    channel fraction (a layer's weights are ``C_out * C_in``), so ``sqrt(fraction)`` is close to linear in
    the ratio, and the next ratio is where that line meets the middle of the target's window.  It is kept
    at least a fifth of the interval from either end, so a model that is not quadratic still narrows the
    interval as bisection does; the invariants (``lo`` too big, ``hi`` fits) are the same."""
    s = state.settings
    while state.trials < budget and not state.in_window(best):
        mid = 0.5 * (lo + hi)
        kind = state.binding(best)
        if lo_fracs is not None and kind != "latency" and kind in lo_fracs:
            aim = math.sqrt(max(s.targets[kind] - 0.5 * s.tolerances[kind], 1e-12))
            a, b = math.sqrt(lo_fracs[kind]), math.sqrt(best.fracs[kind])
            if a > b:
                mid = lo + (a - aim) / (a - b) * (hi - lo)
                mid = min(max(mid, lo + 0.2 * (hi - lo)), hi - 0.2 * (hi - lo))
        c = state.trial(mid)
        if state.fits(c):
            hi, best = mid, c
        else:
            lo, lo_fracs = mid, (c.fracs if lo_fracs is not None else None)
        if hi - lo < 1e-4:
            break
    return lo, hi, best


def refine_uniform(state: SearchState, lo: float, hi: float, best: Candidate) -> Candidate:
    """Per-layer pruning: every group steps at once under a uniform ratio, so the size can jump over the
    window between ``lo`` (too big) and ``hi`` (fits).  The groups take ``hi`` one at a time (deepest first,
    the rest ``lo``), bisecting on how many do; the candidate with the least room that fits wins."""
    roots = list(reversed(state.group_roots()))
    lo_k, hi_k = 0, len(roots)
    while hi_k - lo_k > 1 and state.trials < state.settings.max_trials + 12:
        k = (lo_k + hi_k) // 2
        c = state.trial(lo, {name: hi for name in roots[:k]})
        if state.fits(c):
            hi_k = k
            if state.room(c) < state.room(best):
                c.ratio, best = hi, c
            if state.in_window(c):
                break
        else:
            lo_k = k
    state.budget_spent = not state.in_window(best) and hi_k - lo_k > 1
    return best


def refine_global(state: SearchState, best: Candidate) -> Candidate:
    """Global pruning: one more kept channel (or ``round_to`` of them) in a large, residual-coupled group can
    move the size by a few percent at once.  Start from the allocation that fits and give channels back to
    the most-pruned groups first while the targets still hold: ``round_to`` (or 1) at first, twice as many
    after every step that fits and half as many after one that overshoots (down to ``round_to``), so a
    winner far below its window (the smallest allowed model, when global ratios prune nothing) comes up in
    a few dozen candidates rather than one channel at a time.  It ends in the window, when no group can take
    ``round_to`` more channels (the nearest size below), or at the trial budget (``state.budget_spent``).
    A latency-bound winner is kept as it is: one group's channels move the latency by less than its noise."""
    if state.binding(best) == "latency":
        return best
    roots = state.group_roots()
    full = channel_counts(state.model)
    counts_now = channel_counts(best.model)
    kept = {r: counts_now[r] for r in roots}
    base = state.settings.round_to or 1
    budget = state.settings.max_trials + 48
    step = base

    def local_ratios(counts):
        return {r: 1 - (counts[r] + 0.5) / full[r] for r in roots}

    while not state.in_window(best) and state.trials < budget:
        order = sorted((r for r in roots if kept[r] + base <= full[r]), key=lambda r: kept[r] / full[r])
        moved = False
        for r in order:
            give = step
            while state.trials < budget:
                give = max(base, min(give, (full[r] - kept[r]) // base * base))
                counts = {**kept, r: kept[r] + give}
                c = state.trial(0.0, local_ratios(counts), use_global=False)
                if state.fits(c):
                    kept, c.ratio, best, moved = counts, best.ratio, c, True
                    step = 2 * give
                    break
                if give == base:
                    break  # this group cannot take even round_to more
                give = give // 2 // base * base
                step = max(base, give)
            if moved or state.trials >= budget:
                break
        if not moved:
            break  # no group can take channels back without overshooting, or the budget is spent
    state.budget_spent = not state.in_window(best) and state.trials >= budget
    return best


def refine(state: SearchState, lo: float, hi: float, best: Candidate) -> Candidate:
    """``best`` when it is in the window, else :func:`refine_uniform` or :func:`refine_global`."""
    if state.in_window(best):
        return best
    if not state.settings.global_pruning:
        return refine_uniform(state, lo, hi, best)
    return refine_global(state, best)


def confirm_latency(state: SearchState, found: Candidate, lo: float, hi: float, best: Candidate) -> tuple[Candidate, list[str]]:
    """Re-measure the winner twice more, alternating with the dense model so that drift hits both, before
    trusting a latency target.  A winner then over the target was under it by chance: its channel counts
    (and any path to them) count as too big and the sizes below it are searched (:func:`bisect` from
    ``found``, 6 more trials, and :func:`refine`), twice at most.  Returns the winner and the notes (what
    still misses).  Without a latency target: ``best`` and no notes."""
    notes: list[str] = []
    timer = state.timer
    target = state.settings.targets.get("latency")
    retries = 0
    while timer is not None:
        for _ in range(2):
            if state.base_latency is None:
                state.dense_latencies.append(timer(state.model))
            best.latencies.append(timer(best.model))
        best.fracs["latency"] = statistics.median(best.latencies) / state.base_lat()
        if best.fracs["latency"] <= target:
            break
        if retries == 2:
            notes.append(
                f"the pruned model's latency re-measured at {best.fracs['latency']:.3f} of the dense model's, above the "
                f"target {target:g}: the timings vary more than the search can resolve"
            )
            break
        retries += 1
        state.rejected.add(signature(best.model))
        lo = max(lo, best.ratio)
        lo, hi, best = bisect(state, lo, found.ratio, found, state.trials + 6)
        best = refine(state, lo, hi, best)
    return best, notes


# ----------------------------------------------------------------------------------------- entry points


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

    The steps of the module docstring in order (:func:`probe`, :func:`bisect`, :func:`refine`,
    :func:`confirm_latency`) over one :class:`SearchState`.  One bisection on the channel ratio solves
    every target: a candidate fits when every measured fraction is
    at most its target, and the search stops when the binding target (the one with the least room) is
    within its tolerance below it (``tolerance`` for params/MACs, ``latency_tolerance`` for latency, both
    absolute, in ratio). ``base`` (default: ``model``'s size) is what the fractions are of.

    Latency: ``latency_fn(model)`` returns seconds per batch (a float or a
    :class:`~convsim_shrink.measure.latency.Latency`, whose median and spread are used); the default times
    ``example_inputs`` with :func:`~convsim_shrink.measure.latency.latency_meter`. Every candidate that meets the
    params/MACs targets is measured in full (no per-layer model); the dense model is measured in the same
    process before the search (unless ``base_latency``, in seconds, is given). Timings are noisy, so a
    candidate's latency is the median of every measurement of its channel allocation (revisits measure
    again, up to ``POOL`` times), and the winner is re-measured twice more, alternating with the dense
    model; if it is then over the target, it counts as too big and the search continues at smaller sizes
    (twice at most). What still misses, and a wide spread of timings, is said in ``note``.

    ``cost_exponent`` > 0 divides every group's scores by the MACs one of its channels costs to that power
    (:func:`channel_costs`): with global pruning, channels are then compared by importance per unit of
    compute, which spends a MACs or latency target where compute is (0: scores as the criterion gives them).

    ``compensator`` (:class:`~convsim_shrink.prune.compensation.Compensator`): the search runs as without it
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
    settings = SearchSettings.of(
        target_params=target_params, target_macs=target_macs, target_latency=target_latency, tolerance=tolerance,
        latency_tolerance=latency_tolerance, round_to=round_to, global_pruning=global_pruning, max_layer_ratio=max_layer_ratio,
        max_trials=max_trials,
    )
    targets = settings.targets
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    base = base or measure(model, example_inputs)
    timer = None
    dense_latencies: list[float] = []
    if "latency" in targets:
        timer = LatencyTimer(latency_fn if latency_fn is not None else latency_meter(example_inputs))
        if base_latency is None:
            dense_latencies.append(timer(model))
    ignored = list(ignored_layers or [])
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    cached = CachedImportance(importance, channel_costs(model, example_inputs) if cost_exponent else None, cost_exponent)
    state = SearchState(settings, model, example_inputs, base, cached, ignored, channel_counts(model), base_channels,
                        timer, base_latency, dense_latencies)

    # the model as it is (the base itself, or an earlier step of iterative pruning)
    size = measure(model, example_inputs)
    current = Candidate(model, size, {k: getattr(size, k) / getattr(base, k) for k in ("params", "macs") if k in targets}, 0.0)
    if timer is not None:
        current.latencies = state.pooled[signature(model)] = dense_latencies if base_latency is None else [timer(model)]
        current.fracs["latency"] = statistics.median(current.latencies) / state.base_lat()
    if state.fits(current):
        if state.in_window(current):
            current.model = copy.deepcopy(model)
            return state.result(current)
        raise TargetUnreachableError(
            f"the model is already at {describe(current.fracs, targets)} of the base, below the target "
            + ", ".join(f"{NAMES[k]} {t:g}" for k, t in targets.items())
        )

    found = probe(state)
    lo_ratio, hi_ratio, best = bisect(state, 0.0, found.ratio, found, max_trials, lo_fracs=current.fracs)
    best = refine(state, lo_ratio, hi_ratio, best)
    best, notes = confirm_latency(state, found, lo_ratio, hi_ratio, best)
    if state.fits(best) and not state.in_window(best):
        k = state.binding(best)
        if state.budget_spent:
            notes.append(
                f"pruned to {best.fracs[k]:.4f} of the base {NAMES[k]}, more than {settings.tolerances[k]} below the "
                f"target {targets[k]:g}: the search stopped after {state.trials} candidates; a size nearer the target "
                f"may exist" + (" (prune.global_pruning=false prunes layer by layer)" if global_pruning else "")
            )
        else:
            notes.append(
                f"pruned to {best.fracs[k]:.4f} of the base {NAMES[k]}: the nearest channel count below {targets[k]:g} "
                f"(round_to={round_to}) is more than {settings.tolerances[k]} below the target"
            )
    if timer is not None and timer.warning:
        notes.append(timer.warning)
    note = "; ".join(notes) or None
    if note and warn:
        warnings.warn(note, stacklevel=2)
    out = state.result(best, note)
    release_memory(model)  # the candidates the search dropped
    if compensator is not None:
        out.uncompensated = best.model
        out.model = prune_copy(
            model, example_inputs, cached, best.args["ratio"], round_to=round_to, global_pruning=best.args["global_pruning"],
            max_layer_ratio=max_layer_ratio, ignored=ignored, overrides=best.args["overrides"], compensator=compensator,
        )
        if signature(out.model) != signature(best.model):
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
    :class:`~convsim_shrink.prune.compensation.Compensator`, fitted on that stage's model.
    With a latency target and several steps, the dense model's latency (median of 3 measurements) is the
    base of every stage (``base_latency``, seconds per batch, when the caller measured it already, also with
    one step). Other keyword arguments go to :func:`prune_to_target`.

    ``plan``: an :class:`~convsim_shrink.prune.safety.IgnorePlan` of the layers to leave alone; every
    stage then runs through :func:`~convsim_shrink.prune.safety.prune_safely` (the plan rebound to that
    stage's model, the pruned model verified, torch-pruning's errors turned into one-line
    :class:`~convsim_shrink.prune.safety.PruningError`), and ``result.plan`` is the plan used last."""
    targets = {k: t for k, t in zip(KINDS, (target_params, target_macs, target_latency)) if t is not None}
    x = example_inputs.to(next(model.parameters()).device)
    base = measure(model, x)
    kwargs.setdefault("base_channels", channel_counts(model))  # max_layer_ratio holds over all the steps together
    if target_latency is not None and latency_fn is None:
        latency_fn = latency_meter(x)
    if target_latency is not None and steps > 1 and base_latency is None:
        timer = LatencyTimer(latency_fn)
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
            result, plan = prune_safely(model, x, prune, plan=plan.for_model(model))
            result.plan = plan
        model = result.model
        if between is not None and step < steps:
            between(model, step)
    assert result is not None
    return result
