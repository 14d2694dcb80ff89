"""Recording one forward pass op by op (a :class:`~torch.overrides.TorchFunctionMode`, so any eager
model works, with no ``torch.fx`` tracing), and keeping torch-pruning's own tracing from crashing on a
channel shuffle (:func:`tolerant_tracing`)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
COMPUTE = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_reshape_alias"}
SPLITS = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "__getitem__", "hsplit", "vsplit"}
CATS = {"cat", "concat", "concatenate", "stack", "hstack"}
SHUFFLES = {"pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}
#: layer types whose outputs can be zeroed per channel for the function check (channel dim 1 or -1)
ZERO_DIM1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.PReLU)
ZERO_DIMLAST = (nn.Linear,)



@dataclass
class Op:
    func: str
    module: str | None  # the module whose parameters/buffers the call used
    inputs: list[tuple[int | None, tuple[int, ...]]]  # (producing op, shape) of each activation input
    outputs: list[tuple[int, ...]]
    dim: int | None = None  # dim argument of cat/split-like ops, normalised to be >= 0
    channel_slice: bool = False  # __getitem__ that selects part of dim 1


def flatten(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flatten(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for k in obj.__dataclass_fields__ for t in flatten(getattr(obj, k))]
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
        self.ops: list[Op] = []
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
        tensors = [t for t in flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
        acts = [t for t in tensors if id(t) in self.producer]
        module = next((self.owners.get(id(t)) or self.derived_owner.get(id(t)) for t in tensors
                       if id(t) in self.owners or id(t) in self.derived_owner), None)
        outs = [t for t in flatten(out) if isinstance(t, torch.Tensor)]
        if not acts:  # weight arithmetic (e.g. weight standardisation): remember whose weights it is
            if module is not None:
                for t in outs:
                    self.derived_owner[id(t)] = module
                    self.keep.append(t)
            return out
        ndim = acts[0].dim()
        op = Op(
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
    ops: list[Op]
    outputs: list[int | None]  # producing op of every output tensor
    names: dict[str, nn.Module]  # module name -> module
    used: set[str]  # modules whose compute ran

    def largest_tensor(self) -> int:
        """Elements of the largest tensor an op of the forward pass produced (0 if none)."""
        return max((math.prod(shape) for op in self.ops for shape in op.outputs), default=0)

    def is_compute(self, i: int) -> bool:
        op = self.ops[i]
        return op.func in COMPUTE and op.module is not None and isinstance(self.names.get(op.module), PRUNABLE)

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
                    or op.func in CATS
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


def owners(model: nn.Module) -> dict[int, str]:
    owners: dict[int, str] = {}
    for name, m in model.named_modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            owners.setdefault(id(t), name)
    return owners


def example_batch(example_inputs, n: int = 2):
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


def call_model(model: nn.Module, inputs):
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
    recorder = _Recorder(owners(work))
    inputs = example_batch(example_inputs) if train else example_inputs
    recorder.mark_inputs(flatten(inputs))
    try:
        with torch.no_grad(), warnings.catch_warnings(), recorder:
            warnings.simplefilter("ignore")
            out = call_model(work, inputs)
    finally:
        work.train(was_training)
    outputs = [recorder.producer.get(id(t)) for t in flatten(out)]
    names = dict(work.named_modules())
    used = {op.module for op in recorder.ops if op.module is not None and op.func in COMPUTE}
    return Trace(recorder.ops, outputs, names, used)




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
