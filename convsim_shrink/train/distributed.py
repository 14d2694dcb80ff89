"""Helpers for ``torchrun``: this process's rank, the world size, and unwrapping DDP / compiled models.

Without an initialised process group every helper answers as for a single process.
"""

from __future__ import annotations

import torch
from torch import nn


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else 1


def is_main_process() -> bool:
    """Rank 0: the process that shows progress and writes files."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile
