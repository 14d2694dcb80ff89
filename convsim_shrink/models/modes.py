"""Running a model in evaluation mode for a while, and leaving it as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in evaluation mode inside the block; its own train/eval mode is restored after, also
    when the block raises.  Gradients are not touched (combine with ``torch.no_grad()`` as needed)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
