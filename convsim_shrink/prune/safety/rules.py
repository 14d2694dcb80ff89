"""The static rules: the layers to leave alone, found from a recorded forward pass in evaluation and
training mode (see the rules in :mod:`convsim_shrink.prune.safety`)."""

from __future__ import annotations

import math

from torch import nn

from .plan import OPS, IgnorePlan
from .tracing import CATS, RESHAPES, SHUFFLES, SPLITS, Op, Trace, record_trace


def _is_bad_reshape(op: Op) -> bool:
    if op.func not in RESHAPES or not op.inputs or not op.outputs:
        return False
    src, dst = op.inputs[0][1], op.outputs[0]
    if len(src) < 2 or src == dst:
        return False
    if len(src) == 2:  # (N, F) -> (N, C, H, W): features become channels
        return len(dst) > 2
    if dst[:2] == src[:2]:  # channel dim kept (e.g. (N, C, H, W) -> (N, C, H*W))
        return False
    if len(dst) == 2 and dst[0] == src[0] and dst[1] == math.prod(src[1:]):  # flatten to features
        return False
    return True


def _split_reaches_cat(trace: Trace, start: int, consumers: dict[int, list[int]]) -> bool:
    """Whether the pieces of a channel split reach a channel concatenation before any conv/linear layer."""
    stack, seen = [start], set()
    while stack:
        i = stack.pop()
        for j in consumers.get(i, ()):
            if j in seen:
                continue
            seen.add(j)
            op = trace.ops[j]
            if op.func in CATS and op.dim == 1:
                return True
            if not trace.is_compute(j):
                stack.append(j)
    return False


#: the static rules, by name (``plan_ignored_layers(rules=...)`` can switch them off, e.g. to test trials)
RULES = ("output", "reshape", "pixel-shuffle", "split-cat", "train-only")


def apply_rules(model: nn.Module, example_inputs, plan: IgnorePlan, rules=RULES) -> Trace:
    """Mark in ``plan`` the layers the static ``rules`` leave alone; the forward pass's trace (eval mode)."""
    eval_trace = record_trace(model, example_inputs, train=False)
    try:
        train_trace = record_trace(model, example_inputs, train=True)
    except Exception:  # a model that cannot run in training mode on this input: eval rules only
        train_trace = None
    for trace in (eval_trace, train_trace):
        if trace is None or "output" not in rules:
            continue
        for name in trace.producers(trace.outputs):
            plan.add(name, "output")
    consumers = eval_trace.consumers()
    for i, op in enumerate(eval_trace.ops):
        kind = None
        if op.func in SHUFFLES:
            kind = "pixel-shuffle" if "pixel" in op.func else "reshape"
        elif _is_bad_reshape(op):
            kind = "reshape"
        elif (op.func in SPLITS and (op.dim == 1 or op.channel_slice)
              and op.inputs and len(op.inputs[0][1]) >= 3 and _split_reaches_cat(eval_trace, i, consumers)):
            kind = "split-cat"
        if kind in rules:
            for name in eval_trace.producers([p for p, _ in op.inputs[:1]]):
                plan.add(name, kind)
            for name in eval_trace.grouped_consumers(i, consumers):
                plan.add(name, kind, f"a grouped/depthwise conv reading {OPS[kind]}, which torch-pruning cannot map")
    if train_trace is not None and "train-only" in rules:
        only_train = train_trace.used - eval_trace.used
        for i, op in enumerate(train_trace.ops):
            if op.module in only_train and train_trace.is_compute(i):
                feeders = [p for p, _ in op.inputs[:1]]
                for name in train_trace.producers(feeders):
                    if name not in only_train:
                        plan.add(name, "train-only", f"feeds '{op.module}', which runs only in training mode and which torch-pruning does not trace")
    return eval_trace
