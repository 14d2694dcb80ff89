"""The ``pt2`` export format: a ``torch.export`` ExportedProgram (``model.pt2``, dynamic batch),
checked against the eager model."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from ..io import atomic_write_bytes
from ..measure.latency import make_batch
from ..models import evaluating
from .registry import ExportJob, Written


def export_pt2(model: nn.Module, path: str | Path, example_inputs: torch.Tensor, *, dynamic_batch: bool = True) -> float:
    """Save ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``), load it back and
    return the max |loaded - eager| output difference.

    The batch dimension is dynamic (``torch.export.Dim``, 1 to 65536) unless ``dynamic_batch`` is
    False; the check runs ``example_inputs`` and, when dynamic, a seeded batch of a different size.
    The program is exported from the model in eval mode (batch norm uses its running statistics), on
    the model's device. Written atomically (``io.atomic_write_bytes``: a temporary file, then ``os.replace``).

    Raises :class:`CheckpointError` when ``torch.export`` cannot capture the model.
    """
    path = Path(path)
    device = next(model.parameters()).device
    x = example_inputs.to(device)
    with evaluating(model):
        dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
        # torch.export specialises a dimension of size 1, so a dynamic batch is traced with two rows
        traced = make_batch(x, 2) if dynamic_batch and len(x) == 1 else x
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=dynamic)
        except Exception as exc:
            raise CheckpointError(
                f"torch.export cannot capture this model ({first_line(exc, 200, with_type=True)}); use the onnx or convsim format"
            ) from None
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        loaded = load(path)
        checks = [x]
        if dynamic_batch:
            g = torch.Generator().manual_seed(0)
            checks.append(torch.randn(len(x) + 2, *x.shape[1:], generator=g).to(device))
        diff = 0.0
        with torch.no_grad():
            for xi in checks:
                diff = max(diff, float((loaded(xi) - model(xi)).abs().max()))
        return diff


def load(path: str | Path) -> nn.Module:
    """The callable module of an ExportedProgram saved by :func:`export_pt2` (``torch.export.load``).

    It runs as it was exported (eval mode: batch norm uses its running statistics); torch 2.14 raises
    ``NotImplementedError`` on ``.eval()``/``.train()`` of such a module, so do not call them.

    Raises :class:`CheckpointError` when the file is missing or not a readable ExportedProgram.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch.export program ({first_line(exc)}); re-export it") from None


def write(job: ExportJob) -> Written:
    """``model.pt2`` and its max output difference to the eager model (report field ``pt2_max_abs_diff``)."""
    diff = export_pt2(job.model, job.path, job.example_inputs)
    return Written(job.path, "pt2", {"pt2_max_abs_diff": diff}, f"max abs difference to the eager model {diff:.2e}")


def check(opset: int = 17) -> None:
    """``torch.export`` ships with torch; whether it captures the model shows only when it runs."""
