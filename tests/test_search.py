"""The target search's steps one by one, over a fake state whose trials are formulas instead of pruned models
(the end-to-end search is in test_pruning.py)."""

import math

import pytest
from torch import nn

from convsim_shrink.errors import ConfigError, TargetUnreachableError
from convsim_shrink.prune.pruning import Size
from convsim_shrink.prune.search import (
    Candidate,
    SearchSettings,
    SearchState,
    bisect,
    confirm_latency,
    probe,
    refine,
    refine_global,
    refine_uniform,
    signature,
)


class FakeState(SearchState):
    """``size_of(ratio, overrides, limit, rounding) -> fracs``; every candidate's model is one conv whose
    channel count encodes the call, so that signatures differ between candidates."""

    def __init__(self, settings, size_of, timer=None, roots=("a", "b", "c", "d")):
        super().__init__(settings, nn.Conv2d(1, 1000, 1), None, Size(1, 1), None, [], {}, timer=timer, base_latency=1.0)
        self.size_of, self.calls, self.fake_roots = size_of, [], list(roots)

    def trial(self, ratio, overrides=None, *, use_global=None, all_kinds=False, limit=None, rounding=False):
        self.trials += 1
        self.calls.append((ratio, overrides))
        fracs = self.size_of(ratio, overrides, limit, rounding)
        keep = 1 + len(self.calls)  # a new architecture each call
        return Candidate(nn.Conv2d(1, keep, 1), Size(0, 0), {k: v for k, v in fracs.items() if k in self.settings.targets}, ratio)

    def smallest(self, limit, rounding):
        c = self.trial(0.0, {"smallest": limit}, use_global=False, all_kinds=True, limit=limit, rounding=rounding)
        c.ratio = limit
        return c

    def group_roots(self):
        return list(self.fake_roots)


def quadratic(ratio, overrides, limit, rounding):
    """Parameters fall with the square of the kept channels (a conv's weights: in x out)."""
    return {"params": (1 - ratio) ** 2, "macs": (1 - ratio) ** 2}


def settings(**kw):
    kw.setdefault("target_params", 0.5)
    return SearchSettings.of(**kw)


def test_settings_refuse_no_target_and_targets_outside_zero_one():
    with pytest.raises(ConfigError, match="give a pruning target"):
        SearchSettings.of()
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            SearchSettings.of(target_macs=bad)


def test_the_binding_target_is_the_one_with_least_room_in_tolerances():
    s = SearchSettings.of(target_params=0.5, target_latency=0.6, tolerance=0.01, latency_tolerance=0.05)
    fracs = {"params": 0.45, "latency": 0.55}  # params: 5 tolerances of room, latency: 1
    assert s.binding(fracs) == "latency" and math.isclose(s.room(fracs), 1.0)
    assert s.fits_fracs(fracs) and not s.fits_fracs({"params": 0.45}) and not s.fits_fracs({"params": 0.51, "latency": 0.5})


def test_bisect_lands_the_quadratic_size_in_its_window():
    state = FakeState(settings(target_params=0.5, tolerance=0.01), quadratic)
    found = state.trial(0.9)
    lo, hi, best = bisect(state, 0.0, 0.9, found, budget=40)
    assert 0.49 <= best.fracs["params"] <= 0.5 and state.in_window(best)
    exact = 1 - math.sqrt(0.5)  # the ratio where the size is exactly the target
    assert lo < exact <= hi and best.ratio == hi
    assert quadratic(lo, None, None, None)["params"] > 0.5  # lo never fits


def test_interpolation_lands_a_quadratic_size_in_fewer_trials_than_bisection():
    runs = {}
    for interpolate in (False, True):
        state = FakeState(settings(target_params=0.5, tolerance=0.01), quadratic)
        found = state.trial(0.9)
        lo, hi, best = bisect(state, 0.0, 0.9, found, budget=40, lo_fracs={"params": 1.0} if interpolate else None)
        assert state.in_window(best) and quadratic(lo, None, None, None)["params"] > 0.5 and best.ratio == hi
        runs[interpolate] = state.trials - 1
    assert runs[True] == 1 and runs[False] >= 4, runs  # sqrt(size) is linear in the ratio: one step


def test_interpolation_still_narrows_the_interval_where_the_size_is_not_quadratic():
    def cubic_then_flat(ratio, overrides, limit, rounding):  # far from the sqrt model: steep, then flat
        return {"params": max(0.3, (1 - ratio) ** 6)}

    state = FakeState(settings(target_params=0.5, tolerance=0.001), cubic_then_flat)
    found = state.trial(0.9)
    lo, hi, best = bisect(state, 0.0, 0.9, found, budget=60, lo_fracs={"params": 1.0})
    assert state.in_window(best), (lo, hi, best.fracs)
    assert cubic_then_flat(lo, None, None, None)["params"] > 0.5 >= best.fracs["params"]
    assert state.trials - 1 <= 20  # each step keeps at most 4/5 of the interval


def test_a_latency_target_bisects_at_the_midpoint():
    state = FakeState(settings(target_params=None, target_latency=0.5, latency_tolerance=0.01),
                      lambda r, o, li, ro: {"latency": (1 - r) ** 2})
    found = Candidate(nn.Conv2d(1, 1, 1), Size(0, 0), {"latency": 0.01}, 0.9)
    bisect(state, 0.0, 0.9, found, budget=1, lo_fracs={"latency": 1.0})
    assert state.calls == [(0.45, None)]


def test_bisect_stops_at_its_trial_budget():
    state = FakeState(settings(target_params=0.5, tolerance=1e-6), quadratic)
    found = state.trial(0.9)
    before = state.trials
    bisect(state, 0.0, 0.9, found, budget=before + 3)
    assert state.trials == before + 3


def steps(ratio, overrides, limit, rounding):
    """A uniform ratio jumps over the window: lo=0.2 gives 0.56, hi=0.4 gives 0.40; each group moved to hi
    takes 0.04 off."""
    if overrides:
        return {"params": 0.56 - 0.04 * len(overrides)}
    return {"params": 0.56 if ratio <= 0.2 else 0.40}


def test_refine_uniform_moves_the_deepest_groups_to_the_larger_ratio():
    state = FakeState(settings(target_params=0.5, tolerance=0.01), steps)
    best = state.trial(0.4)
    assert state.fits(best) and not state.in_window(best)
    refined = refine(state, 0.2, 0.4, best)
    assert math.isclose(refined.fracs["params"], 0.48) and refined.ratio == 0.4
    # the deepest groups first (roots reversed), at the larger ratio; the others stay at lo
    assert state.calls[-2] == (0.2, {"d": 0.4, "c": 0.4}) and state.calls[-1] == (0.2, {"d": 0.4})
    assert refine_uniform(state, 0.2, 0.4, refined) is not None


def test_refine_keeps_a_candidate_already_in_its_window_and_a_latency_bound_global_one():
    state = FakeState(settings(target_params=0.5), quadratic)
    inside = Candidate(nn.Conv2d(1, 3, 1), Size(0, 0), {"params": 0.495}, 0.3)
    assert refine(state, 0.2, 0.3, inside) is inside and state.trials == 0
    state = FakeState(settings(target_params=None, target_latency=0.5, global_pruning=True), quadratic)
    loose = Candidate(nn.Conv2d(1, 3, 1), Size(0, 0), {"latency": 0.3}, 0.3)
    assert refine(state, 0.2, 0.3, loose) is loose and state.trials == 0  # latency noise beats one group's channels


def test_probe_takes_the_upper_end_when_it_fits():
    state = FakeState(settings(target_params=0.5), quadratic)
    found = probe(state)
    assert found.ratio == 0.9 and state.calls == [(0.9, None)]


def test_probe_steps_down_from_the_upper_end_when_only_smaller_ratios_fit():
    def bumpy(ratio, overrides, limit, rounding):  # the upper end leaves layers whole: bigger than 0.7's
        if overrides:
            return {"params": 0.1}
        return {"params": 0.9 if ratio >= 0.85 else (1 - ratio) ** 2}

    state = FakeState(settings(target_params=0.5), bumpy)
    found = probe(state)
    assert found.ratio == 0.8 and [r for r, _ in state.calls] == [0.9, 0.0, 0.8]


def test_probe_keeps_no_copy_of_the_probes_that_missed():
    """On vit_l_32 (305 M parameters) every probe's pruned copy stayed alive while the probe stepped down:
    the search ran out of an 18 GB cap.  Only the candidate found keeps its model."""
    import gc
    import weakref

    def late(ratio, overrides, limit, rounding):  # only 0.5 and below fit: five misses before it
        if overrides:
            return {"params": 0.1}
        return {"params": 0.9 if ratio > 0.55 else (1 - ratio) ** 2}

    state = FakeState(settings(target_params=0.5), late)
    made, held = [], []
    trial = state.trial

    def tracked(*a, **kw):
        gc.collect()
        held.append(sum(r() is not None for r in made))  # copies alive while the next one is made
        c = trial(*a, **kw)
        made.append(weakref.ref(c.model))
        return c

    state.trial = tracked
    found = probe(state)
    assert found.ratio == 0.5 and len(made) == 6  # 0.9, the smallest, 0.8 ... 0.5
    assert max(held) <= 1, held  # the smallest model (the fallback when no ratio fits), no probe that missed


def test_probe_refusal_names_a_setting_that_reaches_the_target():
    def rounded(ratio, overrides, limit, rounding):  # round_to keeps too much; without it the floor fits
        return {"params": 0.3 if overrides and rounding is None else 0.6}

    state = FakeState(settings(target_params=0.5, round_to=8), rounded)
    with pytest.raises(TargetUnreachableError, match=r"prune.round_to=null reaches it \(down to 0.300 of the params\)"):
        probe(state)
    state = FakeState(settings(target_params=0.5), lambda *a: {"params": 0.6})
    with pytest.raises(TargetUnreachableError, match="smallest reachable is 0.600.*does not reach it either; raise the target to at least 0.6"):
        probe(state)


class ScriptedTimer:
    """Seconds per call from a script (the dense model is always 1.0)."""

    def __init__(self, dense_model, script):
        self.dense, self.script, self.count, self.seconds, self.warning = dense_model, list(script), 0, 0.0, None

    def __call__(self, model):
        self.count += 1
        return 1.0 if model is self.dense else self.script.pop(0)


def test_confirm_latency_keeps_a_winner_that_holds_on_remeasurement():
    state = FakeState(settings(target_params=None, target_latency=0.5), quadratic)
    state.timer = ScriptedTimer(state.model, [0.45, 0.48])
    best = Candidate(nn.Conv2d(1, 3, 1), Size(0, 0), {"latency": 0.49}, 0.5, latencies=[0.49])
    kept, notes = confirm_latency(state, best, 0.4, 0.5, best)
    assert kept is best and notes == [] and best.latencies == [0.49, 0.45, 0.48] and state.trials == 0


def test_confirm_latency_rejects_a_lucky_winner_and_searches_below_it():
    def latency(ratio, overrides, limit, rounding):
        return {"latency": 1 - ratio}

    state = FakeState(settings(target_params=None, target_latency=0.5, latency_tolerance=0.05), latency)
    lucky = Candidate(nn.Conv2d(1, 3, 1), Size(0, 0), {"latency": 0.49}, 0.51, latencies=[0.49])
    found = Candidate(nn.Conv2d(1, 4, 1), Size(0, 0), {"latency": 0.1}, 0.9, latencies=[0.1])
    state.timer = ScriptedTimer(state.model, [0.6, 0.6] + [0.45] * 10)  # the lucky one re-measures at 0.6
    best, notes = confirm_latency(state, found, 0.4, 0.51, lucky)
    assert signature(lucky.model) in state.rejected and best is not lucky and notes == []
    assert all(r > 0.51 for r, _ in state.calls)  # only sizes below the rejected one were tried
    assert best.fracs["latency"] <= 0.5


def test_confirm_latency_says_so_when_the_winner_keeps_missing():
    state = FakeState(settings(target_params=None, target_latency=0.5), lambda r, *a: {"latency": 0.49})
    state.timer = ScriptedTimer(state.model, [0.7] * 100)  # every re-measurement misses
    best = Candidate(nn.Conv2d(1, 3, 1), Size(0, 0), {"latency": 0.49}, 0.5, latencies=[0.49])
    found = Candidate(nn.Conv2d(1, 4, 1), Size(0, 0), {"latency": 0.3}, 0.9, latencies=[0.3])
    _, notes = confirm_latency(state, found, 0.4, 0.5, best)
    assert len(notes) == 1 and "vary more than the search can resolve" in notes[0]


class Groups(nn.Module):
    def __init__(self, counts):
        super().__init__()
        for name, c in counts.items():
            self.add_module(name, nn.Conv2d(1, c, 1))


class FakeGlobalState(SearchState):
    """Four groups of ``width`` channels; a candidate's size is the fraction of the channels kept (linear),
    and a per-layer trial keeps ``full * (1 - ratio) - 0.5`` channels, as ``refine_global`` asks."""

    def __init__(self, settings, width=3000, unit=1):
        full = {n: width for n in ("a", "b", "c", "d")}
        super().__init__(settings, Groups(full), None, Size(1, 1), None, [], dict(full), base_latency=1.0)
        self.full, self.unit = full, unit

    def group_roots(self):
        return list(self.full)

    def trial(self, ratio, overrides=None, *, use_global=None, all_kinds=False, limit=None, rounding=False):
        self.trials += 1
        counts = {r: round(self.full[r] * (1 - overrides[r]) - 0.5) // self.unit * self.unit for r in self.full}
        frac = sum(counts.values()) / sum(self.full.values())
        return Candidate(Groups(counts), Size(0, 0), {"params": frac}, ratio)

    def smallest_candidate(self, keep):
        return self.trial(0.0, {r: 1 - (keep + 0.5) / self.full[r] for r in self.full})


def test_refine_global_comes_up_from_the_smallest_model_in_a_few_dozen_candidates():
    """vit_b_16 in the coverage benchmark: global ratios pruned nothing, the smallest model (10 % of the
    channels) fitted, and giving back one channel at a time ran out of trials 0.1 below a 0.5 target."""
    state = FakeGlobalState(settings(target_params=0.5, tolerance=0.01, global_pruning=True))
    start = state.smallest_candidate(300)
    assert start.fracs["params"] == pytest.approx(0.1)
    best = refine_global(state, start)
    assert state.in_window(best) and not state.budget_spent
    assert state.trials - 1 <= 40, state.trials


def test_refine_global_says_when_its_budget_ended_it_and_when_the_channel_counts_did():
    # a window no allocation can hit: 0.5 - 1e-9 .. 0.5 with channels in units of 7
    state = FakeGlobalState(settings(target_params=0.5, tolerance=1e-9, global_pruning=True, max_trials=4), unit=7)
    best = refine_global(state, state.smallest_candidate(301))
    assert not state.in_window(best) and state.budget_spent and state.trials >= 4 + 48
    state = FakeGlobalState(settings(target_params=0.5, tolerance=1e-9, global_pruning=True, max_trials=400), unit=7)
    best = refine_global(state, state.smallest_candidate(301))
    assert not state.budget_spent and 0.4999 < best.fracs["params"] <= 0.5  # the nearest allocation below
