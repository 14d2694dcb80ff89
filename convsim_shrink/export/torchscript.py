"""The ``torchscript`` export format: a traced TorchScript archive (``model.ts``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from ..io import atomic_path
from .registry import ExportJob, Written


def export_torchscript(model: nn.Module, path: str | Path, example_inputs: torch.Tensor) -> Path:
    """``model`` traced on ``example_inputs`` (N, C, H, W) in eval mode and saved (atomically) to ``path``."""
    path = Path(path)
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example_inputs)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path


def write(job: ExportJob) -> Written:
    return Written(export_torchscript(job.model, job.path, job.example_inputs), "torchscript")


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The archive as a ``torch.jit.ScriptModule`` in eval mode; raises :class:`CheckpointError` when it
    is unreadable."""
    try:
        return torch.jit.load(str(path), map_location=map_location).eval()
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable TorchScript archive ({first_line(exc)})") from None


def check(opset: int = 17) -> None:
    """Tracing needs nothing beyond torch."""
