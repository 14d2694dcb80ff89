"""Model zoo: ``create_model(name, ...)``, ``list_models()``, and the rebuild spec of a model."""

from . import mobilenet, resnet, simple, vgg  # noqa: F401  (registers the families)
from ._registry import SPEC_ATTR, create_model, list_models, register_model, scale
from .modes import evaluating

__all__ = ["SPEC_ATTR", "create_model", "list_models", "register_model", "scale", "classifier_of", "evaluating"]


def classifier_of(model):
    """The final classification layer (never pruned on its outputs)."""
    import torch.nn as nn

    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        return getter()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
