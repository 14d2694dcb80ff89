"""The outcome of resolving a model source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class Source:
    """A starting model: ``model``; ``spec``, what rebuilds its architecture (also set as
    ``model.convsim_spec``, so :func:`convsim_shrink.save` can write it); ``pretrained``, whether it
    arrived with trained weights (then pre-minimisation and dense training are skipped by default);
    ``description``, one line for the console and the report; ``header``, the metadata of the
    checkpoint it came from (its ``recipe`` names the data set), or None."""

    model: nn.Module
    spec: dict[str, Any]
    pretrained: bool
    description: str
    header: dict[str, Any] | None = field(default=None)
