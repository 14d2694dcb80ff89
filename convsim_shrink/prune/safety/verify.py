"""Checking a pruned model: it runs in both modes and gives outputs of the shapes it gave before."""

from __future__ import annotations

import copy
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .plan import PruningError
from .tracing import call_model, example_batch, flatten


@dataclass(frozen=True)
class OutputSignature:
    """Shapes (without the batch dimension) of every output tensor, in evaluation and training mode."""

    eval: tuple[tuple[int, ...], ...]
    train: tuple[tuple[int, ...], ...] | None


def _shapes(out) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape[1:]) for t in flatten(out))


def output_signature(model: nn.Module, example_inputs) -> OutputSignature:
    """The output shapes of ``model`` on ``example_inputs`` in both modes (the model is not changed:
    the training-mode pass runs on a copy).  Raises :class:`PruningError` if the model cannot run."""
    try:
        eval_out = forward(model, example_inputs, train=False)
    except Exception as exc:
        raise PruningError(f"the model does not run on an input of shape {shape_of(example_inputs)} ({describe_error(exc)})") from None
    try:
        train_out = forward(model, example_batch(example_inputs), train=True)
        train_shapes = _shapes(train_out)
    except Exception:
        train_shapes = None
    return OutputSignature(_shapes(eval_out), train_shapes)


def forward(model: nn.Module, inputs, *, train: bool):
    work = copy.deepcopy(model) if train else model
    was_training = work.training
    work.train(train)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call_model(work, inputs)
    finally:
        work.train(was_training)


def shape_of(inputs) -> str:
    return "x".join(str(s) for s in inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message (file:line where raised)`` in at most about 200 characters."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if tb:
        frame = tb[-1]
        where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


_OOM_TEXT = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the process running out of memory: a ``MemoryError``, or the ``RuntimeError`` (or
    ``torch.OutOfMemoryError``) that PyTorch's allocators raise for it."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT))


def raised_in_torch_pruning(exc: BaseException) -> bool:
    """Whether torch-pruning's code (or a forward pass it ran) is on the traceback of ``exc``."""
    return any("torch_pruning" in frame.filename.replace("\\", "/").split("/") for frame in traceback.extract_tb(exc.__traceback__))


def verify_pruned(model: nn.Module, example_inputs, expected: OutputSignature | torch.Size | Sequence[int]) -> None:
    """Check that a pruned model still runs, in evaluation and training mode, and that its outputs have
    the expected shapes (``expected``: an :func:`output_signature` of the model before pruning, or the
    expected shape of its evaluation-mode output, batch dimension included or not).  Outputs must be
    finite where the input is.  The model is not changed.  Raises :class:`PruningError` (one line)."""
    try:
        eval_out = forward(model, example_inputs, train=False)
    except Exception as exc:
        raise PruningError(f"the pruned model no longer runs ({describe_error(exc)})") from None
    got = _shapes(eval_out)
    if not isinstance(expected, OutputSignature):
        shape = tuple(expected)
        batch = flatten(eval_out)[0].shape[0] if flatten(eval_out) else None
        want = shape[1:] if len(shape) == len(got[0]) + 1 and shape[0] == batch else shape
        expected = OutputSignature((tuple(want),) + got[1:], None)
    if got != expected.eval:
        raise PruningError(f"pruning changed the model's output shape from {_fmt(expected.eval)} to {_fmt(got)}")
    for t in flatten(eval_out):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PruningError("the pruned model's outputs are not finite (NaN or infinity)")
    if expected.train is not None:
        try:
            train_out = forward(model, example_batch(example_inputs), train=True)
        except Exception as exc:
            raise PruningError(f"the pruned model no longer runs in training mode ({describe_error(exc)})") from None
        got_train = _shapes(train_out)
        if got_train != expected.train:
            raise PruningError(f"pruning changed the model's training-mode output shape from {_fmt(expected.train)} to {_fmt(got_train)}")


def _fmt(shapes) -> str:
    return ", ".join("(" + ", ".join(map(str, s)) + ")" for s in shapes) or "nothing"
