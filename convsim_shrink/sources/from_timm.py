"""Model source ``timm:NAME``: a timm model (``pip install 'convsim-shrink[timm]'``); timm adapts the
classes and input channels itself."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import ConfigError, ConvSimError, first_line, unknown
from ..models import SPEC_ATTR
from .adapting import is_file_spec, load_state_into, need, read_state_dict
from .base import Source

TIMM_INSTALL = "pip install 'convsim-shrink[timm]'"


def require_timm(what: str):
    """The timm module, or a ConfigError naming ``what`` needs it and how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{what} needs timm, which is not installed: {TIMM_INSTALL}") from None
    return timm


def resolve(name: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None, **_) -> Source:
    """``timm:NAME`` for ``num_classes`` classes and ``in_chans`` channels; ``weights``: ``DEFAULT``
    (timm's download) or a state dict file."""
    timm = require_timm(f"timm:{name}")
    num_classes, in_channels = need(num_classes, "num_classes"), need(in_channels, "in_channels")
    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    kwargs = {"num_classes": num_classes, "in_chans": in_channels}
    file_weights = weights is not None and is_file_spec(weights)
    if weights is not None and not file_weights and weights != "DEFAULT":
        raise ConfigError(f"timm weights are chosen by the model name (e.g. timm:{name}.TAG); use --weights DEFAULT or --weights FILE")
    pretrained = weights == "DEFAULT"
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except ConvSimError:
        raise
    except Exception as exc:
        if pretrained:
            raise ConfigError(f"could not download timm's weights for {name} ({first_line(exc, with_type=True)}); with no internet, pass --weights FILE (a state dict)") from None
        raise ConfigError(f"timm:{name} cannot be built ({first_line(exc, with_type=True)})") from None
    description = f"timm {name}, " + ("pretrained weights" if pretrained else "random weights")
    if file_weights:
        heads = [model.default_cfg.get("classifier")] if getattr(model, "default_cfg", {}).get("classifier") else []
        stem = model.default_cfg.get("first_conv") if getattr(model, "default_cfg", None) else None
        notes = load_state_into(model, read_state_dict(weights), f"timm:{name}", heads=heads, stem=stem)
        pretrained, description = True, f"timm {name}, weights from {weights}" + (f" ({'; '.join(notes)})" if notes else "")
    spec = {"source": "timm", "name": name, "kwargs": kwargs}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description)


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The architecture of a timm spec, fresh weights (nothing downloaded)."""
    timm = require_timm(f"timm:{spec['name']}")
    return timm.create_model(spec["name"], pretrained=False, **spec.get("kwargs", {}))
