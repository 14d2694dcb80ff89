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

import contextlib
import copy
import math
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConvSimError

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
_COMPUTE = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_reshape_alias"}
_SPLITS = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "__getitem__", "hsplit", "vsplit"}
_CATS = {"cat", "concat", "concatenate", "stack", "hstack"}
_SHUFFLES = {"pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}
#: layer types whose outputs can be zeroed per channel for the function check (channel dim 1 or -1)
_ZERO_DIM1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.PReLU)
_ZERO_DIMLAST = (nn.Linear,)

#: what each static rule is about, as a reason's object
_OPS = {
    "reshape": "a reshape that splits or merges the channel dimension (e.g. a channel shuffle)",
    "pixel-shuffle": "a pixel shuffle (channels become space)",
    "split-cat": "a channel split whose pieces are concatenated again",
}
REASONS = {
    "output": "produces the model's output; pruning it would change the output shape",
    **{kind: f"feeds {what}, which torch-pruning cannot map" for kind, what in _OPS.items()},
    "train-only": "feeds a layer that runs only in training mode (e.g. an auxiliary head), which torch-pruning does not trace",
}


class PruningError(ConvSimError):
    """Torch-pruning failed on this model, or the pruned model no longer runs or changed its outputs."""


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Ignored:
    """One layer left unpruned: its name in ``model.named_modules()``, the rule, and a one-line reason."""

    name: str
    kind: str
    reason: str


@dataclass
class IgnorePlan:
    """The layers to leave unpruned, each with its reason.

    Iterating a plan yields the *modules* of the model it was made for, so it can be passed as
    ``ignored_layers=plan`` to :func:`convsim_shrink.prune.pruning.prune_to_target`; for a copy of that model
    use :meth:`for_model`.  ``trials`` counts the trial prunings run to make it.
    """

    entries: list[Ignored] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    trials: int = 0
    refused: str | None = None  # set when nothing in the model can be pruned safely

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def layers(self) -> list[nn.Module]:
        """The ignored modules of the model the plan was made for."""
        if self.model is None:
            return []
        return self.modules(self.model)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The ignored modules looked up by name in ``model`` (a copy of the planned model)."""
        found = dict(model.named_modules())
        return [found[e.name] for e in self.entries if e.name in found]

    def for_model(self, model: nn.Module) -> "IgnorePlan":
        """The same plan bound to ``model`` (e.g. a deep copy), so iterating it yields that model's modules."""
        return IgnorePlan(list(self.entries), model, self.trials, self.refused)

    def add(self, name: str, kind: str, reason: str | None = None) -> bool:
        if name in self:
            return False
        self.entries.append(Ignored(name, kind, reason or REASONS[kind]))
        return True

    def left_alone(self) -> list[Ignored]:
        """Entries beyond the output layers (the layers a user would not expect to stay whole)."""
        return [e for e in self.entries if e.kind != "output"]

    def summary(self) -> str:
        """One line for the console and the report, e.g. ``left 3 layers unpruned: classifier.1 (produces
        the model's output); stage2.0.branch2.5, stage2.1.branch2.5 (feed a reshape ...)``."""
        if self.refused:
            return f"cannot prune this model: {self.refused}"
        if not self.entries:
            return "every layer can be pruned"
        by_reason: dict[str, list[str]] = {}
        for e in self.entries:
            by_reason.setdefault(e.reason, []).append(e.name)
        parts = []
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{shown} ({reason})")
        n = len(self.entries)
        return f"left {n} layer{'s' if n != 1 else ''} unpruned: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ignored": [{"layer": e.name, "rule": e.kind, "reason": e.reason} for e in self.entries],
            "trials": self.trials,
            "refused": self.refused,
        }


# -------------------------------------------------------------------------------------- recording


@dataclass
class _Op:
    func: str
    module: str | None  # the module whose parameters/buffers the call used
    inputs: list[tuple[int | None, tuple[int, ...]]]  # (producing op, shape) of each activation input
    outputs: list[tuple[int, ...]]
    dim: int | None = None  # dim argument of cat/split-like ops, normalised to be >= 0
    channel_slice: bool = False  # __getitem__ that selects part of dim 1


def _flatten(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for k in obj.__dataclass_fields__ for t in _flatten(getattr(obj, k))]
    return []


def _dim_arg(name: str, args: tuple, kwargs: dict, ndim: int) -> int | None:
    position = {"cat": 1, "concat": 1, "concatenate": 1, "stack": 1, "chunk": 2, "split": 2, "split_with_sizes": 2,
                "tensor_split": 2, "unbind": 1, "narrow": 1}.get(name)
    if position is None:
        return None
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None:
        dim = args[position] if len(args) > position and isinstance(args[position], int) else 0
    return dim + ndim if dim < 0 else dim


def _slices_channels(index) -> bool:
    """Whether an indexing expression ``x[index]`` selects part of dim 1."""
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    first, second = index[0], index[1]
    if first is Ellipsis or second is Ellipsis or second is None:
        return False
    if isinstance(second, slice):
        return second != slice(None)
    return isinstance(second, (int, torch.Tensor, list))


class _Recorder(TorchFunctionMode):
    """Records every torch function call of a forward pass whose inputs derive from the model's input."""

    def __init__(self, owners: dict[int, str]):
        super().__init__()
        self.owners = owners  # id(parameter or buffer) -> module name
        self.ops: list[_Op] = []
        self.producer: dict[int, int | None] = {}  # id(activation tensor) -> op index (None: model input)
        self.derived_owner: dict[int, str] = {}  # id(tensor computed from a module's weights) -> module
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive so ids stay unique

    def mark_inputs(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self.producer[id(t)] = None
            self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__", "dim", "size", "numel", "_set_grad_enabled", "is_floating_point"):
            return out
        tensors = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
        acts = [t for t in tensors if id(t) in self.producer]
        module = next((self.owners.get(id(t)) or self.derived_owner.get(id(t)) for t in tensors
                       if id(t) in self.owners or id(t) in self.derived_owner), None)
        outs = [t for t in _flatten(out) if isinstance(t, torch.Tensor)]
        if not acts:  # weight arithmetic (e.g. weight standardisation): remember whose weights it is
            if module is not None:
                for t in outs:
                    self.derived_owner[id(t)] = module
                    self.keep.append(t)
            return out
        ndim = acts[0].dim()
        op = _Op(
            func=name,
            module=module,
            inputs=[(self.producer[id(t)], tuple(t.shape)) for t in acts],
            outputs=[tuple(t.shape) for t in outs],
            dim=_dim_arg(name, args, kwargs, ndim),
            channel_slice=name == "__getitem__" and len(args) > 1 and _slices_channels(args[1]),
        )
        index = len(self.ops)
        self.ops.append(op)
        for t in outs:
            self.producer[id(t)] = index
            self.keep.append(t)
        return out


@dataclass
class Trace:
    ops: list[_Op]
    outputs: list[int | None]  # producing op of every output tensor
    names: dict[str, nn.Module]  # module name -> module
    used: set[str]  # modules whose compute ran

    def is_compute(self, i: int) -> bool:
        op = self.ops[i]
        return op.func in _COMPUTE and op.module is not None and isinstance(self.names.get(op.module), _PRUNABLE)

    def consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j, op in enumerate(self.ops):
            for p, _ in op.inputs:
                if p is not None:
                    out.setdefault(p, []).append(j)
        return out

    def producers(self, starts: Sequence[int | None]) -> list[str]:
        """Prunable layers whose output channels reach the given ops' outputs through channel-preserving
        operations (followed backwards; a conv/linear layer stops the walk)."""
        found: list[str] = []
        stack = [s for s in starts if s is not None]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            op = self.ops[i]
            if self.is_compute(i):
                if op.module not in found:
                    found.append(op.module)
                continue
            out_shape = op.outputs[0] if op.outputs else ()
            single = len(op.inputs) == 1
            for p, shape in op.inputs:
                if p is None:
                    continue
                follows = (
                    single
                    or op.func in _CATS
                    or (len(shape) >= 2 and len(out_shape) >= 2 and shape[1] == out_shape[1])
                )
                if follows:
                    stack.append(p)
        return found


    def grouped_consumers(self, start: int, consumers: dict[int, list[int]]) -> list[str]:
        """Grouped/depthwise convolutions reading ``start``'s output (through channel-preserving ops):
        torch-pruning ties their output channels to their input channels, so their groups reach back."""
        found: list[str] = []
        stack, seen = [start], set()
        while stack:
            i = stack.pop()
            for j in consumers.get(i, ()):
                if j in seen:
                    continue
                seen.add(j)
                if self.is_compute(j):
                    module = self.names[self.ops[j].module]
                    if getattr(module, "groups", 1) > 1 and self.ops[j].module not in found:
                        found.append(self.ops[j].module)
                else:
                    stack.append(j)
        return found


def _owners(model: nn.Module) -> dict[int, str]:
    owners: dict[int, str] = {}
    for name, m in model.named_modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            owners.setdefault(id(t), name)
    return owners


def _example_batch(example_inputs, n: int = 2):
    """The example input repeated to a batch of ``n`` (training-mode BatchNorm needs more than one value)."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.shape[0] >= n:
            return example_inputs
        repeated = example_inputs.repeat(n, *([1] * (example_inputs.dim() - 1)))
        if not example_inputs.is_floating_point():
            return repeated
        return repeated + 0.01 * torch.randn(
            n * example_inputs.shape[0], *example_inputs.shape[1:], generator=torch.Generator().manual_seed(0)
        ).to(example_inputs)
    return example_inputs


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def record_trace(model: nn.Module, example_inputs, train: bool) -> Trace:
    """One forward pass of (a copy of) ``model`` in the given mode, recorded op by op."""
    work = copy.deepcopy(model) if train else model
    was_training = work.training
    work.train(train)
    recorder = _Recorder(_owners(work))
    inputs = _example_batch(example_inputs) if train else example_inputs
    recorder.mark_inputs(_flatten(inputs))
    try:
        with torch.no_grad(), warnings.catch_warnings(), recorder:
            warnings.simplefilter("ignore")
            out = _call(work, inputs)
    finally:
        work.train(was_training)
    outputs = [recorder.producer.get(id(t)) for t in _flatten(out)]
    names = dict(work.named_modules())
    used = {op.module for op in recorder.ops if op.module is not None and op.func in _COMPUTE}
    return Trace(recorder.ops, outputs, names, used)


# ----------------------------------------------------------------------------------- static rules


def _is_bad_reshape(op: _Op) -> bool:
    if op.func not in _RESHAPES or not op.inputs or not op.outputs:
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
            if op.func in _CATS and op.dim == 1:
                return True
            if not trace.is_compute(j):
                stack.append(j)
    return False


#: the static rules, by name (``plan_ignored_layers(rules=...)`` can switch them off, e.g. to test trials)
RULES = ("output", "reshape", "pixel-shuffle", "split-cat", "train-only")


def _static_plan(model: nn.Module, example_inputs, plan: IgnorePlan, rules=RULES) -> None:
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
        if op.func in _SHUFFLES:
            kind = "pixel-shuffle" if "pixel" in op.func else "reshape"
        elif _is_bad_reshape(op):
            kind = "reshape"
        elif (op.func in _SPLITS and (op.dim == 1 or op.channel_slice)
              and op.inputs and len(op.inputs[0][1]) >= 3 and _split_reaches_cat(eval_trace, i, consumers)):
            kind = "split-cat"
        if kind in rules:
            for name in eval_trace.producers([p for p, _ in op.inputs[:1]]):
                plan.add(name, kind)
            for name in eval_trace.grouped_consumers(i, consumers):
                plan.add(name, kind, f"a grouped/depthwise conv reading {_OPS[kind]}, which torch-pruning cannot map")
    if train_trace is not None and "train-only" in rules:
        only_train = train_trace.used - eval_trace.used
        for i, op in enumerate(train_trace.ops):
            if op.module in only_train and train_trace.is_compute(i):
                feeders = [p for p, _ in op.inputs[:1]]
                for name in train_trace.producers(feeders):
                    if name not in only_train:
                        plan.add(name, "train-only", f"feeds '{op.module}', which runs only in training mode and which torch-pruning does not trace")


# ------------------------------------------------------------------------------------ tracing fix


@contextlib.contextmanager
def tolerant_tracing():
    """While active, torch-pruning's reshape index mapping leaves a reshape it cannot size (a channel
    shuffle makes torch-pruning 1.x divide by zero while building the dependency graph) unmapped instead
    of raising.  Safe only with the plan's ignored layers: they keep every channel count through such a
    reshape fixed.  A no-op for torch-pruning versions without that function."""
    try:
        from torch_pruning.dependency import index_mapping
    except ImportError:  # pragma: no cover - other torch-pruning layouts
        yield
        return
    original = getattr(index_mapping, "update_reshape_index_mapping", None)
    if original is None:  # pragma: no cover
        yield
        return

    def tolerant(graph, node):
        try:
            original(graph, node)
        except (ZeroDivisionError, ValueError, IndexError):
            pass

    index_mapping.update_reshape_index_mapping = tolerant
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


# --------------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class OutputSignature:
    """Shapes (without the batch dimension) of every output tensor, in evaluation and training mode."""

    eval: tuple[tuple[int, ...], ...]
    train: tuple[tuple[int, ...], ...] | None


def _shapes(out) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape[1:]) for t in _flatten(out))


def output_signature(model: nn.Module, example_inputs) -> OutputSignature:
    """The output shapes of ``model`` on ``example_inputs`` in both modes (the model is not changed:
    the training-mode pass runs on a copy).  Raises :class:`PruningError` if the model cannot run."""
    try:
        eval_out = _forward(model, example_inputs, train=False)
    except Exception as exc:
        raise PruningError(f"the model does not run on an input of shape {_shape_of(example_inputs)} ({_short(exc)})") from None
    try:
        train_out = _forward(model, _example_batch(example_inputs), train=True)
        train_shapes = _shapes(train_out)
    except Exception:
        train_shapes = None
    return OutputSignature(_shapes(eval_out), train_shapes)


def _forward(model: nn.Module, inputs, *, train: bool):
    work = copy.deepcopy(model) if train else model
    was_training = work.training
    work.train(train)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _call(work, inputs)
    finally:
        work.train(was_training)


def _shape_of(inputs) -> str:
    return "x".join(str(s) for s in inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__


def _short(exc: BaseException) -> str:
    """``Type: first line of the message (file:line where raised)`` in at most about 200 characters."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if tb:
        frame = tb[-1]
        where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _raised_in_torch_pruning(exc: BaseException) -> bool:
    """Whether torch-pruning's code (or a forward pass it ran) is on the traceback of ``exc``."""
    return any("torch_pruning" in frame.filename.replace("\\", "/").split("/") for frame in traceback.extract_tb(exc.__traceback__))


def verify_pruned(model: nn.Module, example_inputs, expected: OutputSignature | torch.Size | Sequence[int]) -> None:
    """Check that a pruned model still runs, in evaluation and training mode, and that its outputs have
    the expected shapes (``expected``: an :func:`output_signature` of the model before pruning, or the
    expected shape of its evaluation-mode output, batch dimension included or not).  Outputs must be
    finite where the input is.  The model is not changed.  Raises :class:`PruningError` (one line)."""
    try:
        eval_out = _forward(model, example_inputs, train=False)
    except Exception as exc:
        raise PruningError(f"the pruned model no longer runs ({_short(exc)})") from None
    got = _shapes(eval_out)
    if not isinstance(expected, OutputSignature):
        shape = tuple(expected)
        batch = _flatten(eval_out)[0].shape[0] if _flatten(eval_out) else None
        want = shape[1:] if len(shape) == len(got[0]) + 1 and shape[0] == batch else shape
        expected = OutputSignature((tuple(want),) + got[1:], None)
    if got != expected.eval:
        raise PruningError(f"pruning changed the model's output shape from {_fmt(expected.eval)} to {_fmt(got)}")
    for t in _flatten(eval_out):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PruningError("the pruned model's outputs are not finite (NaN or infinity)")
    if expected.train is not None:
        try:
            train_out = _forward(model, _example_batch(example_inputs), train=True)
        except Exception as exc:
            raise PruningError(f"the pruned model no longer runs in training mode ({_short(exc)})") from None
        got_train = _shapes(train_out)
        if got_train != expected.train:
            raise PruningError(f"pruning changed the model's training-mode output shape from {_fmt(expected.train)} to {_fmt(got_train)}")


def _fmt(shapes) -> str:
    return ", ".join("(" + ", ".join(map(str, s)) + ")" for s in shapes) or "nothing"


# ------------------------------------------------------------------------------------------ trials


def _out_size(module: nn.Module) -> int | None:
    """The number of output channels of a layer whose outputs can be zeroed per channel."""
    for attr in ("out_channels", "num_features", "out_features", "num_parameters"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _out_dim(module: nn.Module) -> int | None:
    if isinstance(module, _ZERO_DIM1):
        return 1
    if isinstance(module, _ZERO_DIMLAST):
        return -1
    return None


@dataclass
class _Group:
    root: str
    members: list[str]  # modules whose output channels the group prunes
    zeroable: bool  # every member's outputs can be zeroed per channel (no cross-channel norms)


def _groups(model: nn.Module, example_inputs, ignored: list[nn.Module]) -> list[_Group]:
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
        groups = []
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=list(_PRUNABLE)):
            members, zeroable = [], True
            for dep, _ in group:
                target = dep.target.module
                if not dg.is_out_channel_pruning_fn(dep.handler) or isinstance(target, nn.Parameter):
                    continue
                name = names.get(id(target))
                if name is None:
                    continue
                if name not in members:
                    members.append(name)
                if _out_dim(target) is None:
                    zeroable = False
            if members:
                groups.append(_Group(members[0], members, zeroable))
    return groups


@dataclass
class TrialSettings:
    """How a trial prunes (the real pruning's mode matters little: trials look for structural errors)."""

    ratio: float = 0.5
    global_pruning: bool = False
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    tolerance: float = 1e-3  # of the function check, relative to the largest output magnitude


def _trial(model: nn.Module, example_inputs, signature: OutputSignature, ignored_names: set[str],
           active: list[_Group], everything: list[_Group], settings: TrialSettings, check_function: bool) -> str | None:
    """Prune the ``active`` groups of a copy of ``model`` (everything else ignored); the problem, or None."""
    import torch_pruning as tp

    trial = copy.deepcopy(model).eval()
    reference = copy.deepcopy(model).eval() if check_function else None
    modules = dict(trial.named_modules())
    active_roots = {g.root for g in active}
    inactive = {g.root for g in everything if g.root not in active_roots}
    ignored = [modules[n] for n in (ignored_names | inactive) if n in modules]
    dead: dict[str, list[int]] = {}
    try:
        with tolerant_tracing(), warnings.catch_warnings():
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
                        size = _out_size(target)
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
    except Exception as exc:
        return f"torch-pruning raised {_short(exc)}"
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
        dim = _out_dim(module)
        if dim is None:
            return None  # cannot zero this layer's outputs: skip the function check

        def zero(mod, inp, out, idx=torch.tensor(sorted(set(idxs))), dim=dim):
            if isinstance(out, torch.Tensor):
                out = out.clone()
                out.index_fill_(dim, idx.to(out.device), 0.0)
            return out

        hooks.append(module.register_forward_hook(zero))
    try:
        want = _flatten(_forward(reference, example_inputs, train=False))
    finally:
        for h in hooks:
            h.remove()
    got = _flatten(_forward(trial, example_inputs, train=False))
    scale = max((float(t.abs().max()) for t in want if t.numel() and t.is_floating_point()), default=0.0)
    for a, b in zip(want, got):
        if a.shape == b.shape and a.is_floating_point():
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if diff > settings.tolerance * max(scale, 1e-6):
                return (f"removing its channels changed the outputs of the channels kept (by {diff:.3g} of {scale:.3g}): "
                        "torch-pruning mis-maps them, or an operation reads across channels")
    return None


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
        _static_plan(model, example_inputs, plan, rules)
    except Exception as exc:
        raise PruningError(f"the model cannot be traced op by op on an input of shape {_shape_of(example_inputs)} ({_short(exc)})") from None
    names = {id(m): n for n, m in model.named_modules()}
    for m in extra:
        if id(m) in names:
            plan.add(names[id(m)], "request", "left alone on request")
    if not trials:
        return plan
    try:
        work = copy.deepcopy(model).eval()
        with tolerant_tracing():
            groups = _groups(work, example_inputs, plan.modules(work))
    except Exception as exc:
        plan.refused = f"torch-pruning cannot build this model's dependency graph ({_short(exc)})"
        return plan
    candidates = [g for g in groups if not any(m in plan for m in g.members)]
    _bisect(model, example_inputs, signature, plan, candidates, groups, settings, check_function, max_trials)
    if not [g for g in groups if not any(m in plan for m in g.members)]:
        plan.refused = "no layer can be pruned safely: " + (plan.entries[-1].reason if plan.entries else "torch-pruning finds no prunable group")
    return plan


def _bisect(model, example_inputs, signature, plan: IgnorePlan, candidates: list[_Group], everything: list[_Group],
            settings: TrialSettings, check_function: bool, max_trials: int) -> None:
    """Find the groups whose pruning fails (alone), by bisection; mark them in ``plan``."""
    if not candidates:
        return
    ignored = set(plan.names)

    def run(active: list[_Group]) -> str | None:
        plan.trials += 1
        check = check_function and all(g.zeroable for g in active)
        problem = _trial(model, example_inputs, signature, ignored, active, everything, settings, check)
        if problem is None and check_function and not check:
            zeroable = [g for g in active if g.zeroable]
            if zeroable and zeroable != active and plan.trials < max_trials:
                plan.trials += 1
                problem = _trial(model, example_inputs, signature, ignored, zeroable, everything, settings, True)
        return problem

    problem = run(candidates)
    if problem is None:
        return
    pending = [(candidates, problem)]
    bad: list[tuple[_Group, str]] = []  # failed alone
    untested: list[tuple[_Group, str]] = []  # in a failing set when the trials ran out
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


# -------------------------------------------------------------------------------------- the job


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
    :func:`convsim_shrink.prune.pruning.prune_to_target` with the model, inputs, importance and target) runs
    inside :func:`tolerant_tracing` with the plan bound to ``model``; the ``.model`` of what it returns
    (or the returned module) is checked by :func:`verify_pruned`.  If torch-pruning raises, or the
    check fails, the plan is extended by trials pruned as ``retry_settings`` say (default: global
    pruning of 80% of the channels, harsher than the first plan's trials) and pruning is retried, at most
    ``retries`` times.  ``plan_kwargs`` go to :func:`plan_ignored_layers` when ``plan`` is None.

    Returns ``(result, plan)``.  Errors: the :class:`~convsim_shrink.errors.ConvSimError` subclasses
    ``prune`` raises for the user (e.g. an unreachable target) pass through; everything else from
    inside torch-pruning becomes a one-line :class:`PruningError`.
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
            if not _raised_in_torch_pruning(exc):
                raise  # a bug in the caller's code keeps its traceback
            problem = f"torch-pruning raised {_short(exc)}"
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
    "Ignored", "IgnorePlan", "OutputSignature", "PruningError", "TrialSettings", "REASONS",
    "RULES", "output_signature", "plan_ignored_layers", "prune_safely", "tolerant_tracing", "verify_pruned",
]
