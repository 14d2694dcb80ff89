"""Model source ``torchvision:NAME``: any ``torchvision.models`` classification model; the output layer(s)
and the first conv are replaced when the classes or input channels differ; ``weights`` downloads
torchvision's weights (``DEFAULT`` or a weights name) or loads a state dict file."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import ConfigError, first_line, unknown
from ..models import SPEC_ATTR
from .adapting import (
    apply_adapt,
    find_heads_and_stem,
    is_file_spec,
    load_state_into,
    need,
    read_state_dict,
)
from .base import Source


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _weights_enum(name: str, weights: str):
    """The torchvision weights enum member ``weights`` names for model ``name`` (``DEFAULT``, a member
    name or the full ``Enum.MEMBER`` name); ConfigError with the known names otherwise."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member = weights.split(".")[-1]
    if weights.count(".") == 1 and weights.split(".")[0] != enum.__name__:
        raise ConfigError(f"weights '{weights}' are not {name}'s; its weights are {enum.__name__}: {', '.join(['DEFAULT', *enum.__members__])}")
    if member == "DEFAULT":
        return enum.DEFAULT
    if member not in enum.__members__:
        raise unknown(f"weights of {name}", member, ["DEFAULT", *enum.__members__])
    return enum[member]


def _weights_kwargs(name: str, weights) -> dict[str, Any]:
    """The constructor arguments torchvision's builder implies when it loads ``weights`` (its
    ``_ovewrite_named_param`` calls), so the same architecture is rebuilt without downloading."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name == "googlenet":
        kwargs.update(transform_input=True, aux_logits=False, init_weights=False)
    elif name == "inception_v3":
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def resolve(name: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None, **_) -> Source:
    """``torchvision:NAME`` for ``num_classes`` classes and ``in_channels`` channels (module docstring of
    :mod:`convsim_shrink.sources`)."""
    import torchvision

    names = torchvision_models()
    if name not in names:
        raise unknown("torchvision model", name, names)
    num_classes, in_channels = need(num_classes, "num_classes"), need(in_channels, "in_channels")
    file_weights = weights is not None and is_file_spec(weights)
    enum = _weights_enum(name, weights) if weights is not None and not file_weights else None
    kwargs: dict[str, Any] = {}
    if enum is None:
        kwargs["num_classes"] = num_classes
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"torchvision:{name} cannot be built ({first_line(exc, with_type=True)})") from None
        built_classes = num_classes
    else:
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except Exception as exc:
            raise ConfigError(
                f"could not download torchvision's {enum} weights ({first_line(exc, with_type=True)}); with no internet, download them "
                f"elsewhere and pass --weights FILE (a state dict)"
            ) from None
        built_classes = len(enum.meta["categories"])
    size = (enum.meta.get("min_size", (224, 224))[0] if enum is not None else 0) or _trace_size(name)
    adapt: dict[str, Any] = {}
    heads, stem = [], None
    if num_classes != built_classes or in_channels != 3 or file_weights:
        heads, stem = find_heads_and_stem(model, 3, size)
    if num_classes != built_classes:
        adapt.update(num_classes=num_classes, heads=heads)
    if in_channels != 3:
        if stem is None:
            raise ConfigError(f"torchvision:{name}: no conv reads the input, so it cannot take {in_channels} channels")
        adapt.update(in_channels=in_channels, stem=stem)
        if getattr(model, "transform_input", False):
            adapt["transform_input"] = False  # it rescales exactly three ImageNet channels
    notes = apply_adapt(model, adapt, pretrained=enum is not None)
    pretrained = enum is not None
    description = f"torchvision {name}, " + (f"{enum} weights" if enum is not None else "random weights")
    if file_weights:
        notes += load_state_into(model, read_state_dict(weights), f"torchvision:{name}", heads=heads, stem=stem)
        pretrained, description = True, f"torchvision {name}, weights from {weights}"
    spec = {"source": "torchvision", "name": name, "kwargs": kwargs, "weights": str(enum) if enum is not None else None, "adapt": adapt}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description + (f" ({'; '.join(notes)})" if notes else ""))


def _trace_size(name: str) -> int:
    """An input size the model accepts for tracing (ViTs and MaxViT need their built-in size)."""
    return 224 if name.startswith(("vit_", "maxvit")) else 96 if name == "inception_v3" else 64


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The architecture of a torchvision spec, fresh weights (the weights' name only restores the
    builder's weight-implied arguments; nothing is downloaded)."""
    import torchvision

    name = spec["name"]
    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("weights"):
        kwargs = {**_weights_kwargs(name, _weights_enum(name, spec["weights"])), **kwargs}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    apply_adapt(model, spec.get("adapt", {}), pretrained=False)
    return model
