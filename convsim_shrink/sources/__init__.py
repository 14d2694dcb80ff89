"""Where the starting model comes from: the zoo, torchvision, timm, the user's own code, or a checkpoint.

:func:`resolve_source` turns what the user typed into a :class:`~.base.Source` (which source:
:func:`~.spec.parse_spec`, the only place that decides it; each source is one module listed in
:mod:`.registry`): the model, the spec that
rebuilds its architecture without pickle (stored in exported checkpoints; :func:`rebuild` reads it), whether
it arrived with trained weights, and one line describing it.

================================  =========================================================================
``resnet18``                      a zoo model (:func:`convsim_shrink.create_model`)
``torchvision:NAME``              any ``torchvision.models`` classification model; the output layer(s) and the
                                  first conv are replaced when the classes or input channels differ
``timm:NAME``                     a timm model (``pip install 'convsim-shrink[timm]'``); timm adapts both
``package.module:function``       an import string to a function (or class) returning an ``nn.Module``;
                                  ``num_classes``/``in_channels`` (or ``in_chans``) are passed when it takes them
``PATH.safetensors`` or ``RUN/``  a convsim-shrink export, or a run directory (its ``model.safetensors``,
                                  else ``dense.safetensors``): pretrained
================================  =========================================================================

``weights``: ``DEFAULT`` or a torchvision weights name (``IMAGENET1K_V1`` or
``ResNet18_Weights.IMAGENET1K_V1``) downloads torchvision's weights (timm: ``DEFAULT`` downloads timm's);
a file path loads a state dict from a safetensors file, or from a torch file read with
``torch.load(weights_only=True)`` (nothing unpickled).  Pretrained weights keep the first conv's
knowledge when the input channels differ (:func:`adapt_input_channels`: a grey image gives the
activations of its RGB repetition; extra channels start at zero); the output layers are re-initialised
for another number of classes.

The rebuild spec (JSON, in the checkpoint header):

* zoo: ``{"name", "kwargs"}`` (as before);
* torchvision: ``{"source": "torchvision", "name", "kwargs", "weights", "adapt"}`` where ``kwargs``
  are the builder's arguments, ``weights`` the weights' full name (only to restore the builder's
  weight-implied arguments; never downloaded when loading), ``adapt`` ``{"num_classes", "heads",
  "in_channels", "stem", "transform_input"}``;
* timm: ``{"source": "timm", "name", "kwargs"}``;
* import string: ``{"source": "import", "name": "package.module:function", "kwargs"}`` (loading imports
  that module: code you installed, not code from the file).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..models import SPEC_ATTR
from .base import Source
from .registry import SOURCES
from .spec import ModelSpec, parse_spec

if TYPE_CHECKING:
    from torch import nn


def resolve_source(spec: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None,
                   width: float = 1.0, small_input: bool = True) -> Source:
    """Build the starting model that ``spec`` names (see the module docstring), for ``num_classes``
    classes and ``in_channels`` input channels (for a checkpoint: None takes the checkpoint's; a
    different number is an error). ``width`` and ``small_input`` shape a zoo model (the recipe's
    ``model.width`` and ``model.small_input``, so that its weights file fits); other sources ignore them.

    Raises :class:`~convsim_shrink.errors.ConfigError` (unknown names, with the closest known one; a bad
    import string; timm missing; weights that cannot be downloaded) or
    :class:`~convsim_shrink.errors.CheckpointError` (an unreadable or unfitting weights file or
    checkpoint), each with one line.
    """
    parsed = parse_spec(spec)
    return SOURCES[parsed.kind].implementation().resolve(
        parsed.target, num_classes=num_classes, in_channels=in_channels, weights=weights, width=width, small_input=small_input,
    )


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The architecture ``spec`` describes, with fresh weights (nothing downloaded, nothing unpickled);
    the model carries ``spec`` (less its layer shapes) as ``model.convsim_spec``.  Pruned layer shapes
    (``spec["layers"]``) are re-applied by :func:`convsim_shrink.export.native.load`, not here.
    Raises ConfigError/CheckpointError."""
    source = spec.get("source", "zoo")
    if source not in SOURCES or source == "checkpoint":
        known = ", ".join(k for k in SOURCES if k != "checkpoint")
        raise CheckpointError(f"unknown model source '{source}' in the rebuild spec; this version knows {known}")
    model = SOURCES[source].implementation().rebuild(spec)
    if source != "zoo":  # the zoo's builder records its own spec
        setattr(model, SPEC_ATTR, {k: v for k, v in spec.items() if k != "layers"})
    return model


__all__ = ["ModelSpec", "Source", "SOURCES", "parse_spec", "rebuild", "resolve_source"]
