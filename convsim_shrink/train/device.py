"""Where and how fast training runs: device choice, precision (autocast dtype, gradient scaling, memory
format), moving batches, and seeding.

Fast by default per device: bf16 autocast on CPUs with native bf16 (AMX / AVX512-BF16) and
channels_last; AMP (bf16, else fp16 with a gradient scaler) and channels_last on CUDA.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; naming a device that is not there is a
    :class:`~convsim_shrink.errors.ConfigError`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """How a device runs: autocast dtype (None = fp32), gradient scaling, memory format."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        dt = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.device.type}, {dt}{', channels_last' if self.channels_last else ''}"


def resolve_precision(device: torch.device, precision: str = "auto", channels_last: bool | None = None) -> Precision:
    """The fastest correct settings for ``device`` unless ``precision`` says otherwise."""
    dtype: torch.dtype | None
    if precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("fp16 autocast is not supported on the CPU here; use precision bf16 or fp32")
        dtype = torch.float16
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu":
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    else:
        dtype = None
    cl = device.type in ("cpu", "cuda") if channels_last is None else channels_last
    return Precision(device, dtype, scaler=dtype == torch.float16, channels_last=cl)


def channels_last_hazard(model: torch.nn.Module) -> str | None:
    """The first layer of ``model`` that PyTorch's CPU convolutions (oneDNN) cannot train in channels_last,
    or None.

    A 1×1 conv with stride > 1 whose input has fewer channels than oneDNN's channel block (8 with AVX2, 16
    with AVX-512) writes past its scratch space in the weight gradient when the input is channels_last
    (oneDNN issue 6035, open, "1x1 convolution backward_weights writes past the rtus workspace"): the heap is
    corrupted and the process aborts some steps later ("corrupted size vs. prev_size", "double free").  Such
    a conv is a ResNet shortcut of a model narrower than 1/8 of its width, or of one pruned without
    ``round_to``.  Seen here on torch 2.14.1 (AVX2, 2 to 7 channels; a 4-channel shortcut aborted within 30
    steps, and tests/test_train.py trains one in a subprocess, where a crash is an exit status); the forward
    pass, other kernels and strides, the contiguous format and bf16 autocast (the same conv, 30 steps, twice) are
    not affected; :func:`~convsim_shrink.train.loop.fit` checks fp32 training only.
    """
    block = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
                and 1 < m.in_channels // m.groups < block):
            return f"{name or type(m).__name__} (1x1 conv, stride {max(m.stride)}, {m.in_channels} input channels)"
    return None


def set_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``model`` in place with its 4-d parameters and buffers (2-d conv kernels) in channels_last (or back
    in the contiguous format). ``model.to(memory_format=...)`` also converts 5-d tensors and raises for
    channels_last on them (Conv3d kernels); those, and every other rank, stay as they are."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model._apply(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t)


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s 4-d parameters are laid out channels_last (some of them, none contiguous)."""
    weights = [p for p in model.parameters() if p.dim() == 4 and not p.is_contiguous()]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def to_device(x: torch.Tensor, y: torch.Tensor, prec: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``prec.device``, images in the precision's memory format."""
    x = x.to(prec.device, non_blocking=True)
    if prec.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(prec.device, non_blocking=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
