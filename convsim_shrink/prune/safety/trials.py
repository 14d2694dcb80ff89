"""Trial prunings, the safety net for what the static rules do not know: a copy pruned with torch-pruning
and verified, and the groups bisected when it fails."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import OutOfMemoryError
from ..memory import release_memory
from .limits import GraphLimitError, bounded
from .plan import IgnorePlan
from .tracing import PRUNABLE, ZERO_DIM1, ZERO_DIMLAST, flatten, tolerant_tracing
from .verify import (
    OutputSignature,
    PruningError,
    describe_error,
    forward,
    is_out_of_memory,
    verify_pruned,
)


def out_size(module: nn.Module) -> int | None:
    """The number of output channels of a layer whose outputs can be zeroed per channel."""
    for attr in ("out_channels", "num_features", "out_features", "num_parameters"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def out_dim(module: nn.Module) -> int | None:
    if isinstance(module, ZERO_DIM1):
        return 1
    if isinstance(module, ZERO_DIMLAST):
        return -1
    return None


@dataclass
class Group:
    root: str
    members: list[str]  # modules whose output channels the group prunes
    zeroable: bool  # every member's outputs can be zeroed per channel (no cross-channel norms)


def prunable_groups(model: nn.Module, example_inputs, ignored: list[nn.Module]) -> tuple[list[Group], list[tuple[str, str]]]:
    """Torch-pruning's groups of ``model`` rooted at a prunable layer (as its ``get_all_groups`` finds
    them, ``ignored`` modules' groups left out), each built under :func:`~.limits.bounded`; and the root
    layers whose group passed the limits, each with the limit it passed (their groups are left out).

    Raises :class:`~.limits.GraphLimitError` when building the dependency graph itself passes them."""
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    groups: list[Group] = []
    over: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with bounded("building the dependency graph", model):
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        skip = {id(m) for m in [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]}
        visited: set[int] = set()
        for root in list(dg.module2node):  # torch-pruning's get_all_groups, one bounded group at a time
            if id(root) in skip or id(root) in visited or not isinstance(root, PRUNABLE):
                continue
            pruner = dg.get_pruner_of_module(root)
            channels = pruner.get_out_channels(root) if pruner is not None else None
            if channels is None:
                continue
            try:
                with bounded("building this layer's channel group", model):
                    group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(channels)))
            except GraphLimitError as exc:
                over.append((names.get(id(root), type(root).__name__), exc.limit))
                continue
            members, zeroable, usable = [], True, True
            for dep, _ in group:
                target = dep.target.module
                if not dg.is_out_channel_pruning_fn(dep.handler) or isinstance(target, nn.Parameter):
                    continue
                visited.add(id(target))
                usable = usable and id(target) not in skip
                name = names.get(id(target))
                if name is None:
                    continue
                if name not in members:
                    members.append(name)
                if out_dim(target) is None:
                    zeroable = False
            if members and usable:
                groups.append(Group(members[0], members, zeroable))
    return groups, over


@dataclass
class TrialSettings:
    """How a trial prunes (the real pruning's mode matters little: trials look for structural errors)."""

    ratio: float = 0.5
    global_pruning: bool = False
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    tolerance: float = 1e-3  # of the function check, relative to the largest output magnitude


def trial(model: nn.Module, example_inputs, signature: OutputSignature, ignored_names: set[str],
           active: list[Group], everything: list[Group], settings: TrialSettings, check_function: bool) -> str | None:
    """Prune the ``active`` groups of a copy of ``model`` (everything else ignored); the problem, or None."""
    import torch_pruning as tp

    release_memory(model)  # the last trial's copy, held in cycles by its dependency graph
    trial = copy.deepcopy(model).eval()
    # the function check runs ``model`` itself with hooks that zero the removed channels (in eval mode, no
    # gradients, hooks removed after): a second copy of a 600 M-parameter model ran out of memory
    reference = model if check_function else None
    modules = dict(trial.named_modules())
    active_roots = {g.root for g in active}
    inactive = {g.root for g in everything if g.root not in active_roots}
    ignored = [modules[n] for n in (ignored_names | inactive) if n in modules]
    dead: dict[str, list[int]] = {}
    try:
        with tolerant_tracing(), warnings.catch_warnings(), bounded("pruning a trial copy", trial):
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                trial, example_inputs, importance=tp.importance.MagnitudeImportance(),
                pruning_ratio=settings.ratio, global_pruning=settings.global_pruning,
                max_pruning_ratio=settings.max_layer_ratio, ignored_layers=ignored, round_to=settings.round_to,
            )
            names = {id(m): n for n, m in trial.named_modules()}
            alive: dict[str, list[int]] = {}  # original index of every channel a layer still has
            for group in pruner.step(interactive=True):
                for dep, idxs in group:
                    target = dep.target.module
                    if pruner.DG.is_out_channel_pruning_fn(dep.handler) and not isinstance(target, nn.Parameter):
                        name = names.get(id(target))
                        size = out_size(target)
                        if name is None or size is None:
                            continue
                        # a layer over a concatenation (DenseNet's norms) is cut by several groups, each
                        # in the indexing left by the ones before: translate back to the original
                        current = alive.setdefault(name, list(range(size)))
                        gone = sorted({int(i) for i in idxs if 0 <= int(i) < len(current)})
                        dead.setdefault(name, []).extend(current[i] for i in gone)
                        for i in reversed(gone):
                            del current[i]
                group.prune()
    except GraphLimitError as exc:
        return str(exc)
    except Exception as exc:
        if is_out_of_memory(exc):  # the machine's limit, not this group's fault
            raise OutOfMemoryError(f"ran out of memory while pruning a trial copy of the model ({describe_error(exc)}): "
                                   "run it where more memory is free") from None
        return f"torch-pruning raised {describe_error(exc)}"
    try:
        verify_pruned(trial, example_inputs, signature)
    except PruningError as exc:
        return str(exc)
    if reference is None or not dead:
        return None
    # the function check: with the removed channels made dead in the reference, outputs must not change
    ref_modules = dict(reference.named_modules())
    hooks = []
    for name, idxs in dead.items():
        module = ref_modules[name]
        dim = out_dim(module)
        if dim is None:
            return None  # cannot zero this layer's outputs: skip the function check

        def zero(mod, inp, out, idx=torch.tensor(sorted(set(idxs))), dim=dim):  # noqa: B008 (binds this layer's values once)
            if isinstance(out, torch.Tensor):
                out = out.clone()
                out.index_fill_(dim, idx.to(out.device), 0.0)
            return out

        hooks.append(module.register_forward_hook(zero))
    try:
        want = flatten(forward(reference, example_inputs, train=False))
    finally:
        for h in hooks:
            h.remove()
    got = flatten(forward(trial, example_inputs, train=False))
    scale = max((float(t.abs().max()) for t in want if t.numel() and t.is_floating_point()), default=0.0)
    for a, b in zip(want, got):
        if a.shape == b.shape and a.is_floating_point():
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if diff > settings.tolerance * max(scale, 1e-6):
                return (f"removing its channels changed the outputs of the channels kept (by {diff:.3g} of {scale:.3g}): "
                        "torch-pruning mis-maps them, or an operation reads across channels")
    return None




def bisect_groups(model, example_inputs, signature, plan: IgnorePlan, candidates: list[Group], everything: list[Group],
            settings: TrialSettings, check_function: bool, max_trials: int) -> None:
    """Find the groups whose pruning fails (alone), by bisection; mark them in ``plan``."""
    if not candidates:
        return
    ignored = set(plan.names)

    def run(active: list[Group]) -> str | None:
        plan.trials += 1
        check = check_function and all(g.zeroable for g in active)
        problem = trial(model, example_inputs, signature, ignored, active, everything, settings, check)
        if problem is None and check_function and not check:
            zeroable = [g for g in active if g.zeroable]
            if zeroable and zeroable != active and plan.trials < max_trials:
                plan.trials += 1
                problem = trial(model, example_inputs, signature, ignored, zeroable, everything, settings, True)
        return problem

    problem = run(candidates)
    if problem is None:
        return
    pending = [(candidates, problem)]
    bad: list[tuple[Group, str]] = []  # failed alone
    untested: list[tuple[Group, str]] = []  # in a failing set when the trials ran out
    while pending:
        groups, problem = pending.pop()
        if len(groups) == 1:
            bad.append((groups[0], problem))
            continue
        half = len(groups) // 2
        for part in (groups[:half], groups[half:]):
            if plan.trials >= max_trials:
                untested.extend((g, problem) for g in part)
                continue
            found = run(part)
            if found is not None:
                pending.append((part, found))
    for group, problem in bad:
        coupled = len(group.members) - 1
        extra = f" (with {coupled} coupled layer{'s' if coupled != 1 else ''})" if coupled else ""
        plan.add(group.root, "trial", f"pruning its group{extra} failed a trial: {problem}")
    for group, problem in untested:
        plan.add(group.root, "trial", f"left alone untested: {max_trials} trials ran out while looking for the groups that fail ({problem})")
    rest = [g for g in candidates if g.root not in plan]
    if rest and plan.trials < max_trials:
        final = run(rest)
        if final is not None:  # groups that fail only together: leave all of them alone
            for g in rest:
                plan.add(g.root, "trial", f"pruning it together with other groups failed a trial: {final}")
