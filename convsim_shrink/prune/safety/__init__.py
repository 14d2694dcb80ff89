"""Which layers torch-pruning can prune safely in an arbitrary model, and a check that it did.

Torch-pruning follows channels through a model by tracing its autograd graph.  Some operations defeat
that tracing: it crashes (``ZeroDivisionError``/``IndexError`` from inside torch-pruning), or worse,
prunes without error and leaves a model that no longer runs, returns a different output shape, or wires
the remaining channels to the wrong weights.  :func:`plan_ignored_layers` finds the layers to leave
alone, each with a one-line reason, in two passes:

1. **Static rules**, from one forward pass recorded op by op (a :class:`~torch.overrides.TorchFunctionMode`,
   so any eager model works, with no ``torch.fx`` tracing) in evaluation *and* training mode.  For
   each rule the layers left alone are the convolutions/linear layers whose outputs reach the
   offending operation through channel-preserving operations (activations, norms, additions,
   concatenations):

   * ``output``: the layers that produce the model's outputs (a final ``Linear`` *or* a class-score
     conv as in SqueezeNet; every tensor of a tuple/named-tuple/dict output) -- pruning them changes
     the output shape;
   * ``reshape``: a view/reshape that splits or merges the channel dimension other than flattening
     ``(N, C, H, W) -> (N, C*H*W)``, e.g. a channel shuffle (ShuffleNet);
   * ``pixel-shuffle``: ``pixel_shuffle``/``pixel_unshuffle`` (channels become space);
   * ``split-cat``: a split/chunk/slice along channels whose pieces are concatenated again
     (YOLO-style CSP blocks);
   * ``train-only``: layers that run only in training mode (GoogLeNet's auxiliary heads) are
     invisible to torch-pruning, which traces in evaluation mode, so the layers feeding them keep their
     channel count.

   * ``graph-limit``: layers whose channel group torch-pruning could not finish building within the
     limits of :mod:`.limits` (``prune.graph_seconds``, ``prune.graph_memory_gb``, and, while planning,
     channel indices no more than twice the model's largest tensor): its walk of the dependency graph
     never ends on some index mappings (a ``tensor_split`` in a residual block, an attention block's q, k,
     v chunked from one conv, swin_v2's flatten cycles that multiply the indices at every pass), so each
     group is built under a bound and the ones that pass it are left alone;

2. **Trials** (the safety net for everything the rules do not know): a copy of the model is pruned
   with torch-pruning's ``MetaPruner`` (magnitude importance, half the channels of every group) and
   checked by :func:`verify_pruned`: it must run in both modes, give outputs of the same shapes, and,
   where the removed channels were first made dead (zero outputs), give the *same* outputs -- which
   catches channels wired to the wrong weights.  When a trial fails, the groups are bisected
   (at most ``max_trials`` trials) and every group that fails alone is left unpruned with the error as
   its reason.

:func:`tolerant_tracing` keeps torch-pruning 1.x's reshape index mapping from dividing by zero on a
channel shuffle while the graph is built (the shuffle's layers are left alone by the plan anyway);
wrap every pruning call for a planned model in it.  :func:`prune_safely` does the whole job: plan,
prune (any pruning function taking ``ignored_layers``), verify, and one bounded retry, turning every
exception from inside torch-pruning into :class:`PruningError` (one line).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ...errors import ConvSimError, OutOfMemoryError
from ..memory import release_memory
from .limits import GraphLimitError, GraphLimits, bounded, current_limits, graph_limits
from .plan import REASONS, Ignored, IgnorePlan, PruningError
from .rules import RULES, apply_rules
from .tracing import Trace, record_trace, tolerant_tracing
from .trials import TrialSettings, bisect_groups, prunable_groups
from .verify import (
    OutputSignature,
    describe_error,
    is_out_of_memory,
    output_signature,
    raised_in_torch_pruning,
    shape_of,
    verify_pruned,
)


def plan_ignored_layers(
    model: nn.Module,
    example_inputs,
    *,
    trials: bool = True,
    check_function: bool = True,
    max_trials: int = 24,
    settings: TrialSettings | None = None,
    extra: Sequence[nn.Module] = (),
    rules: Sequence[str] = RULES,
    start: IgnorePlan | None = None,
) -> IgnorePlan:
    """The layers of ``model`` torch-pruning must leave unpruned, each with a reason (see the module
    docstring for the rules).

    ``example_inputs``: one batch the model accepts (shape ``(N, C, H, W)`` for image models; batch 1
    is fine).  ``trials``: also prune copies of the model and bisect failing groups (at most
    ``max_trials`` prunings); ``check_function``: in those trials, also require that pruning channels
    made dead leaves the outputs unchanged.  ``extra``: layers the caller wants left alone too.
    ``rules``: the static rules to apply (:data:`RULES`; fewer only to test the trials).  ``start``: a
    plan to extend (its entries are kept and its layers left alone in the trials).

    The model itself is never changed.  Raises :class:`PruningError` if the model does not run on
    ``example_inputs``; a model of which nothing can be pruned gets a plan with ``refused`` set.
    """
    plan = IgnorePlan(list(start.entries) if start else [], model, start.trials if start else 0)
    settings = settings or TrialSettings()
    signature = output_signature(model, example_inputs)
    try:
        trace = apply_rules(model, example_inputs, plan, rules)
    except Exception as exc:
        raise PruningError(f"the model cannot be traced op by op on an input of shape {shape_of(example_inputs)} ({describe_error(exc)})") from None
    names = {id(m): n for n, m in model.named_modules()}
    for m in extra:
        if id(m) in names:
            plan.add(names[id(m)], "request", "left alone on request")
    if not trials:
        return plan
    # a walk making more indices than twice the largest tensor, or re-adding one dependency again and again,
    # is going round a cycle: stop it at once (GraphLimits.max_indices)
    limits = current_limits()
    if limits.max_indices is None:
        limits = dataclasses.replace(limits, max_indices=2 * max(trace.largest_tensor(), 1))
    with graph_limits(limits):
        try:
            work = copy.deepcopy(model).eval()
            with tolerant_tracing():
                groups, over = prunable_groups(work, example_inputs, plan.modules(work))
        except GraphLimitError as exc:
            plan.refused = str(exc)
            return plan
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemoryError(f"ran out of memory while building the model's dependency graph ({describe_error(exc)}): "
                                       "run it where more memory is free") from None
            plan.refused = f"torch-pruning cannot build this model's dependency graph ({describe_error(exc)})"
            return plan
        for name, limit in over:
            plan.add(name, "graph-limit", f"torch-pruning did not finish following its channels within {limit}")
        del work  # the groups are by name: this copy (a whole model) is not needed in the trials
        candidates = [g for g in groups if not any(m in plan for m in g.members)]
        try:
            bisect_groups(model, example_inputs, signature, plan, candidates, groups, settings, check_function, max_trials)
        except Exception as exc:
            if is_out_of_memory(exc):  # e.g. copying the model for a trial
                raise OutOfMemoryError(f"ran out of memory while pruning a trial copy of the model ({describe_error(exc)}): "
                                       "run it where more memory is free") from None
            raise
    release_memory(model)  # the last trial's copy
    if not [g for g in groups if not any(m in plan for m in g.members)]:
        plan.refused = "no layer can be pruned safely: " + (plan.entries[-1].reason if plan.entries else "torch-pruning finds no prunable group")
    return plan


def prune_safely(
    model: nn.Module,
    example_inputs,
    prune: Callable[..., Any],
    *,
    plan: IgnorePlan | None = None,
    retries: int = 1,
    retry_settings: TrialSettings | None = None,
    **plan_kwargs,
) -> tuple[Any, IgnorePlan]:
    """Plan, prune and verify.

    ``prune(ignored_layers=...)`` (e.g. a ``functools.partial`` of
    :func:`convsim_shrink.prune.search.prune_to_target` with the model, inputs, importance and target) runs
    inside :func:`tolerant_tracing` with the plan bound to ``model``; the ``.model`` of what it returns
    (or the returned module) is checked by :func:`verify_pruned`.  If torch-pruning raises, or the
    check fails, the plan is extended by trials pruned as ``retry_settings`` say (default: global
    pruning of 80% of the channels, harsher than the first plan's trials) and pruning is retried, at most
    ``retries`` times.  ``plan_kwargs`` go to :func:`plan_ignored_layers` when ``plan`` is None.

    Returns ``(result, plan)``.  Errors: the :class:`~convsim_shrink.errors.ConvSimError` subclasses
    ``prune`` raises for the user (e.g. an unreachable target) pass through; running out of memory
    anywhere in it is one :class:`~convsim_shrink.errors.OutOfMemoryError` (no retry); everything else
    from inside torch-pruning becomes a one-line :class:`PruningError`.
    """
    signature = output_signature(model, example_inputs)
    plan = plan if plan is not None else plan_ignored_layers(model, example_inputs, **plan_kwargs)
    if plan.refused:
        raise PruningError(plan.summary())
    retry_settings = retry_settings or TrialSettings(ratio=0.8, global_pruning=True)
    attempt = 0
    while True:
        try:
            with tolerant_tracing():
                result = prune(ignored_layers=plan.for_model(model))
        except ConvSimError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):  # no retry: a second plan and search would need the same memory again
                params = sum(p.numel() for p in model.parameters()) / 1e6
                # gradients (a criterion such as convsim-taylor) are a model's size, and its scoring copy another
                lighter = (" or with a criterion that needs no gradients (--criterion lamp or l2: two model-sized copies fewer)"
                           if any(p.grad is not None for p in model.parameters()) else "")
                raise OutOfMemoryError(
                    f"ran out of memory while pruning copies of the model ({params:,.1f} M parameters; the target search "
                    f"holds several pruned copies at once) ({describe_error(exc)}): run it where more memory is free{lighter}"
                ) from None
            if not raised_in_torch_pruning(exc):
                raise  # a bug in the caller's code keeps its traceback
            problem = f"torch-pruning raised {describe_error(exc)}"
        else:
            try:
                verify_pruned(getattr(result, "model", result), example_inputs, signature)
                return result, plan
            except PruningError as exc:
                problem = str(exc)
        if attempt >= retries:
            raise PruningError(f"pruning failed on this model with {len(plan)} layers left alone: {problem}")
        attempt += 1
        kwargs = {k: v for k, v in plan_kwargs.items() if k not in ("settings", "start")}
        more = plan_ignored_layers(model, example_inputs, settings=retry_settings, start=plan, **kwargs)
        if len(more) == len(plan) or more.refused:
            raise PruningError(f"pruning failed on this model and the trials found no layer to leave alone: {problem}")
        plan = more


__all__ = [
    "GraphLimitError", "GraphLimits", "Ignored", "IgnorePlan", "OutputSignature", "bounded", "graph_limits", "PruningError", "TrialSettings", "REASONS",
    "RULES", "Trace", "output_signature", "plan_ignored_layers", "prune_safely", "raised_in_torch_pruning", "record_trace",
    "tolerant_tracing",
    "verify_pruned",
]
