"""Time and memory limits on torch-pruning's graph work, so that a model it cannot map ends in one line.

Torch-pruning follows channels through the dependency graph in pure Python.  On some models that walk
never ends: an attention block whose q, k and v are chunks of one conv's output, or a ``tensor_split``
inside a residual block, makes the index mapping produce new indices on every pass round a cycle, and
the group being built grows without bound (issue 24 measured 20 GB on a 2,300-parameter model).  Every
call into torch-pruning that builds or walks the graph -- building it, one group, a trial pruning, a
candidate of the target search, the pruning-aware regulariser's groups -- runs inside :func:`bounded`,
which stops it with :class:`GraphLimitError` once it has run longer than ``prune.graph_seconds`` or grown
the process's resident memory by more than ``prune.graph_memory_gb``, naming the module whose channels
torch-pruning was following at that moment.

The limits are checked by a SIGALRM interval timer (every 0.2 s), on the main thread of a POSIX
process; elsewhere (a worker thread, Windows) :func:`bounded` does nothing.  Bounds do not nest: inside
one, an inner :func:`bounded` is part of the outer call.  The prune stage sets the recipe's limits for
everything it calls with :func:`graph_limits`; the defaults hold outside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..index_cache import cached_index_mapping, pruning_epoch
from .plan import PruningError

TICK = 0.2  # seconds between two checks
ROOT = "the model itself"  # the name of the model's own module in messages


@dataclass(frozen=True)
class GraphLimits:
    """``seconds``: time one torch-pruning call may take (the less of its wall time and the process's CPU
    time, so that neither other jobs on a busy machine nor a multi-threaded op trip it); ``memory_gb``: how much it may grow the
    process's resident memory (GiB).  Recipe keys ``prune.graph_seconds`` and ``prune.graph_memory_gb``."""

    seconds: float = 120.0
    memory_gb: float = 4.0
    #: bounds on a group's walk (None: none; the planner sets twice the model's largest tensor): its channel
    #: indices may not pass it, nor may it add one dependency more than ``MAX_DEP_REPEATS`` times.  A walk
    #: past either is going round a cycle (swin_v2's residual streams grew to 2 million indices in 7 s,
    #: maxvit's q/k/v chunks re-add the same dependencies with shifted indices) and would otherwise run to
    #: the time or memory limit, a minute or two per group; it stops at once instead.
    max_indices: int | None = None


class GraphLimitError(PruningError):
    """A torch-pruning call passed its :class:`GraphLimits`; ``module`` names where it was working."""

    def __init__(self, message: str, module: str | None = None, limit: str = ""):
        super().__init__(message)
        self.module, self.limit = module, limit


_LIMITS: contextvars.ContextVar[GraphLimits | None] = contextvars.ContextVar("graph_limits", default=None)
_ACTIVE = threading.local()


@contextlib.contextmanager
def graph_limits(limits: GraphLimits) -> Iterator[GraphLimits]:
    """Every :func:`bounded` call inside the block uses ``limits``."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def current_limits() -> GraphLimits:
    """The limits :func:`graph_limits` set around this call, or the defaults."""
    return _LIMITS.get() or GraphLimits()


def resident_bytes() -> int | None:
    """The process's resident memory in bytes (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def module_at(frame, names: dict[int, str]) -> str | None:
    """The innermost module of ``names`` (``id(module) -> name``) that a frame on the stack from ``frame``
    outwards holds in a local: a module itself, or a torch-pruning node or dependency of one."""
    while frame is not None:
        found = []
        for value in list(frame.f_locals.values()):
            for candidate in (value, getattr(value, "module", None), getattr(getattr(value, "target", None), "module", None)):
                if isinstance(candidate, nn.Module) and id(candidate) in names:
                    found.append(names[id(candidate)])
        if found:  # a frame holding the whole model and one of its layers is working on the layer
            return max(found, key=lambda n: (n != ROOT, n.count("."), len(n)))
        frame = frame.f_back
    return None


@contextlib.contextmanager
def bounded(what: str, model: nn.Module | None = None) -> Iterator[None]:
    """Run the block under :func:`current_limits`; past either limit, raise :class:`GraphLimitError`
    (one line: ``what``, the limit and its recipe key, and the module of ``model`` being worked on).
    Inside it torch-pruning also recomputes its index mappings only after a pruning
    (:func:`~convsim_shrink.prune.index_cache.cached_index_mapping`: the same groups, faster).

    ``what`` completes "torch-pruning ... passed": e.g. ``"building the dependency graph"``.  Signals
    interrupt Python code only between bytecodes, so a limit is noticed once a long C call returns.
    """
    with cached_index_mapping(), deeper_channel_inference():
        with _limited(what, model):
            yield


#: torch-pruning's cap on the steps of its recursive channel inference, inside :func:`bounded`
CHANNEL_INFERENCE_STEPS = 1_000_000
#: Python's recursion limit inside :func:`bounded` (Python 3.11+ runs a Python-to-Python call without C stack;
#: 3.10 spends C stack on every frame, so less there)
RECURSION_FRAMES = 10_000 if sys.version_info >= (3, 11) else 4_000


@contextlib.contextmanager
def deeper_channel_inference(steps: int = CHANNEL_INFERENCE_STEPS) -> Iterator[None]:
    """Torch-pruning (1.6.1) gives up inferring the channels of a concatenation's inputs after 500 recursive
    steps (``dependency.constants.MAX_RECURSION_DEPTH``, a count of steps, not of stack frames) and then fails
    with ``TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'`` while building the graph:
    swin_s, whose patch merging concatenates four slices 18 blocks deep, was refused for it.  The walk also
    visits a node once for every path that reaches it, so a chain of diamonds (``x * sigmoid(x)``, an add of
    two element-wise branches of one tensor) costs 2^depth steps: swin_s's walk ran for minutes once the cap
    was raised.  Inside :func:`bounded` both are fixed for the block (and restored after): the cap is raised
    to ``steps``, and each node's channel count is computed once per graph until a pruning changes it (the
    answer is the same; only the repeated visits go).  The walk
    recurses in Python, two frames a node with the memo, so Python's recursion limit is raised to
    :data:`RECURSION_FRAMES` for the block; a walk deeper than that (about 5,000 nodes in a row) still ends in
    a refusal naming the ``RecursionError``."""
    from torch_pruning.dependency import constants, shape_infer

    with _INFERENCE_LOCK:
        _INFERENCE["depth"] += 1
        if _INFERENCE["depth"] == 1:  # the outermost block patches; an inner one is part of it
            _INFERENCE["saved"] = (constants.MAX_RECURSION_DEPTH, sys.getrecursionlimit(),
                                   {name: getattr(shape_infer, name) for name in _INFERENCES})
            constants.MAX_RECURSION_DEPTH = max(constants.MAX_RECURSION_DEPTH, steps)
            sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_FRAMES))
            for name, fn in _INFERENCE["saved"][2].items():
                setattr(shape_infer, name, _memoised(name, fn))
    try:
        with cached_index_mapping():  # counts the prunings that make a memo stale
            yield
    finally:
        with _INFERENCE_LOCK:
            _INFERENCE["depth"] -= 1
            if _INFERENCE["depth"] == 0:
                cap, frames, originals = _INFERENCE.pop("saved")
                constants.MAX_RECURSION_DEPTH = cap
                sys.setrecursionlimit(frames)
                for name, fn in originals.items():
                    setattr(shape_infer, name, fn)


_INFERENCES = ("infer_out_channels_recursively", "infer_in_channels_recursively")
_INFERENCE: dict = {"depth": 0}
_INFERENCE_LOCK = threading.Lock()
_MEMO_ATTR = "_convsim_channels"  # on a DependencyGraph: (pruning epoch, {(inference, id(node)): channels})


def _memoised(name: str, fn):
    """``fn`` (one of torch-pruning's recursive inferences, which call each other through the module's
    globals) computing each node's answer once per graph until a pruning changes the graph's channel counts
    (:func:`~convsim_shrink.prune.index_cache.pruning_epoch`).  The index mapping asks again for every
    concatenation, split and slice; on swin_s each asked walk was a thousand nodes long."""

    def inference(graph, node, recursive_depth):
        now = pruning_epoch()
        memo = graph.__dict__.get(_MEMO_ATTR)
        if memo is None or memo[0] != now:
            memo = graph.__dict__[_MEMO_ATTR] = (now, {})
        key = (name, id(node))
        known = memo[1]
        if key not in known:
            known[key] = fn(graph, node, recursive_depth)
        return known[key]

    inference.__wrapped__ = fn
    return inference


@contextlib.contextmanager
def _limited(what: str, model: nn.Module | None) -> Iterator[None]:
    if (getattr(_ACTIVE, "on", False) or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer")):
        yield
        return
    limits = current_limits()
    names = {id(m): n or ROOT for n, m in model.named_modules()} if model is not None else {}
    start, cpu0, rss0 = time.monotonic(), time.process_time(), resident_bytes()

    def check(signum, frame):
        # CPU time: a loaded machine gives this process less of the wall time (the coverage benchmark had
        # resnext101_32x8d refused at 120 s beside two other jobs); wall time: threads add CPU time
        elapsed = min(time.monotonic() - start, time.process_time() - cpu0)
        rss = resident_bytes()
        grown = (rss - rss0) / 2**30 if rss is not None and rss0 is not None else 0.0
        if elapsed <= limits.seconds and grown <= limits.memory_gb:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        where = module_at(frame, names)
        at = f" at {where}" if where else ""
        if elapsed > limits.seconds:
            limit = f"its time limit of {limits.seconds:g} s (prune.graph_seconds)"
        else:
            limit = f"its memory limit of {limits.memory_gb:g} GB (prune.graph_memory_gb; it had grown by {grown:.1f} GB)"
        raise GraphLimitError(f"torch-pruning passed {limit} while {what}{at}", where, limit)

    previous = signal.signal(signal.SIGALRM, check)
    _ACTIVE.on = True
    signal.setitimer(signal.ITIMER_REAL, TICK, TICK)
    try:
        with _index_limit(what, names, limits.max_indices):
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _ACTIVE.on = False


#: how often a group's walk may add one dependency (with different indices) before it counts as a cycle
MAX_DEP_REPEATS = 16


@contextlib.contextmanager
def _index_limit(what: str, names: dict[int, str], max_indices: int | None) -> Iterator[None]:
    """Torch-pruning's walk of a channel group stops with :class:`GraphLimitError` once a dependency's
    channel indices number more than ``max_indices`` or reach it in value, or once it adds one dependency to
    the group more than :data:`MAX_DEP_REPEATS` times.  A walk round a cycle makes new indices at every pass
    (a flatten multiplies them, a concatenation or chunk shifts them) and re-adds the same dependencies with
    them; a walk that ends adds each dependency once per distinct index set that reaches it, a few times at
    most.  The flatten index mapping (channel ``c`` -> features ``c*stride .. (c+1)*stride-1``) is stopped
    before it builds a list past the bound."""
    if max_indices is None:
        yield
        return
    from torch_pruning.dependency import group, index_mapping

    def stop(depth: int, why: str) -> GraphLimitError:
        where = module_at(sys._getframe(depth), names)
        at = f" at {where}" if where else ""
        limit = f"a bound on its walk: {why} (it mis-maps an operation here and goes round a cycle)"
        return GraphLimitError(f"torch-pruning passed {limit} while {what}{at}", where, limit)

    flatten, grp = index_mapping._FlattenIndexMapping, group.Group
    original_flatten, original_add = flatten.__call__, grp.add_dep

    def flatten_call(self, idxs):
        if not self.reverse and idxs and max(len(idxs), 1 + max(i.idx for i in idxs)) * self._stride > max_indices:
            raise stop(2, f"its channel indices would pass {max_indices:,}, twice the model's largest tensor")
        return original_flatten(self, idxs)

    def add_dep(self, dep, idxs):
        if idxs and (len(idxs) > max_indices or max(int(getattr(i, "idx", i)) for i in idxs) >= max_indices):
            raise stop(2, f"its channel indices passed {max_indices:,}, twice the model's largest tensor")
        seen = self.__dict__.setdefault("_convsim_adds", {})
        seen[id(dep)] = seen.get(id(dep), 0) + 1
        if seen[id(dep)] > MAX_DEP_REPEATS:
            raise stop(2, f"it reached one dependency more than {MAX_DEP_REPEATS} times")
        return original_add(self, dep, idxs)

    flatten.__call__, grp.add_dep = flatten_call, add_dep
    try:
        yield
    finally:
        flatten.__call__, grp.add_dep = original_flatten, original_add
