"""The model registry: short entry functions registered by name, one factory."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown

_MODELS: dict[str, Callable[..., nn.Module]] = {}

#: attribute set on every model built by :func:`create_model`: what rebuilds it (name and arguments)
SPEC_ATTR = "convsim_spec"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name (``_`` kept); the function builds the model from keyword args."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def scale(channels: int, width: float, divisor: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    value = channels * width
    return max(divisor, int(value / divisor + 0.5) * divisor)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    small_input: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.  Keyword arguments that are ``None`` are dropped, so an option left
    unset never overrides a model's own default.  The arguments are recorded on the model
    (``model.convsim_spec``) so that an exported checkpoint can rebuild it."""
    if name not in _MODELS:
        raise unknown("model", name, _MODELS)
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be positive (got {num_classes}, {in_channels})")
    if not width > 0:
        raise ConfigError(f"width must be positive, got {width}")
    fn = _MODELS[name]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = inspect.signature(fn).parameters
    extra = set(kwargs) - set(accepted)
    if extra:
        raise ConfigError(f"model '{name}' takes no argument(s) {', '.join(sorted(extra))}")
    args = dict(num_classes=num_classes, in_channels=in_channels, width=width, small_input=small_input, **kwargs)
    model = fn(**args)
    setattr(model, SPEC_ATTR, {"name": name, "kwargs": args})
    return model
