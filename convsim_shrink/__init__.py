"""convsim-shrink: compress CNNs by Convolutional Similarity minimisation and similarity-ranked pruning.

Importing the package is cheap: the public names below are loaded from their modules on first use
(PEP 562), so ``convsim-shrink --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ConvSimError

#: public name -> the module that defines it
_LAZY = {
    "conv_similarity": "cs.similarity",
    "conv_similarity_reference": "cs.similarity",
    "layer_similarities": "cs.similarity",
    "model_conv_similarity": "cs.similarity",
    "pairwise_similarity": "cs.similarity",
    "load": "export.load",
    "save": "export.native",
    "create_model": "models",
    "list_models": "models",
    "Runner": "pipeline.runner",
    "ShrinkResult": "pipeline.runner",
    "shrink": "pipeline.runner",
}
_SUBMODULES = ("recipe",)

__all__ = [
    "__version__", "ConvSimError", "conv_similarity", "conv_similarity_reference", "layer_similarities",
    "model_conv_similarity", "pairwise_similarity", "load", "save", "create_model", "list_models", "Runner",
    "ShrinkResult", "shrink", "recipe",
]

if TYPE_CHECKING:
    from . import recipe
    from .cs.similarity import (
        conv_similarity,
        conv_similarity_reference,
        layer_similarities,
        model_conv_similarity,
        pairwise_similarity,
    )
    from .export.load import load
    from .export.native import save
    from .models import create_model, list_models
    from .pipeline.runner import Runner, ShrinkResult, shrink


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
