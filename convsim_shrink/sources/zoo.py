"""Model source: a zoo model by name (:func:`convsim_shrink.create_model`), random weights or a state dict
file."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..models import SPEC_ATTR, create_model
from .adapting import is_file_spec, load_state_into, need, read_state_dict
from .base import Source


def resolve(name: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None,
            width: float = 1.0, small_input: bool = True) -> Source:
    """The zoo model ``name`` for ``num_classes`` classes and ``in_channels`` channels at ``width``;
    ``weights``: a state dict file (the zoo has nothing to download)."""
    model = create_model(name, num_classes=need(num_classes, "num_classes"), in_channels=need(in_channels, "in_channels"),
                         width=width, small_input=small_input)
    pretrained = False
    description = f"zoo model {name}, random weights"
    if weights is not None:
        if is_file_spec(weights):
            load_state_into(model, read_state_dict(weights), f"zoo model {name}")
            pretrained, description = True, f"zoo model {name}, weights from {weights}"
        else:
            raise ConfigError(f"the zoo has no downloadable weights ('{weights}'); pass --weights FILE with a state dict")
    return Source(model, dict(getattr(model, SPEC_ATTR)), pretrained, description)


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The zoo model the spec names, with its recorded arguments."""
    return create_model(spec["name"], **spec.get("kwargs", {}))
