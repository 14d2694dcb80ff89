"""convsim-shrink: compress CNNs by Convolutional Similarity minimisation and similarity-ranked pruning."""

__version__ = "0.1.0"

from .errors import ConvSimError
from .similarity import (
    conv_similarity,
    conv_similarity_reference,
    layer_similarities,
    model_conv_similarity,
    pairwise_similarity,
)

__all__ = [
    "__version__",
    "ConvSimError",
    "conv_similarity",
    "conv_similarity_reference",
    "layer_similarities",
    "model_conv_similarity",
    "pairwise_similarity",
]

from .checkpoint import load, save  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .pipeline import Pipeline, ShrinkResult, shrink  # noqa: E402
from . import recipe  # noqa: E402

__all__ += ["load", "save", "create_model", "list_models", "Pipeline", "ShrinkResult", "shrink", "recipe"]
