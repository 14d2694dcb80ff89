"""Small pure helpers for models that arrive from outside the zoo (issue 12): where their logits are,
which dtype they run in, when training has diverged, and which dense stages a pretrained model skips.

They hold the rules, documented and tested here, so the engine and the pipeline can apply them with
one call each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

# ------------------------------------------------------------------------------------------ logits


def logits_of(output, *, field: str | int | None = None, option: str = "the logits field option") -> torch.Tensor:
    """The class scores in a model's output, by this rule:

    1. ``field`` given: that key of a mapping, attribute of an object, or index of a tuple/list;
    2. a tensor: the output itself;
    3. a ``logits`` field (torchvision's ``GoogLeNetOutputs``/``InceptionOutputs`` named tuples in
       training mode, Hugging Face ``ModelOutput``, a dict with key ``"logits"``): that field;
    4. a tuple or list whose first element is a tensor (the ``(logits, features)`` convention): the
       first element.

    Anything else raises :class:`~convsim_shrink.errors.ConfigError` naming ``option`` (the option that
    sets ``field``).  Shapes are not checked: ``(N, num_classes)`` is what the training loop expects.
    """
    if field is not None:
        try:
            if isinstance(output, Mapping):
                found = output[field]
            elif isinstance(field, int):
                found = output[field]
            else:
                found = getattr(output, field)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise ConfigError(f"the model's output ({_describe(output)}) has no field {field!r}; fix {option}") from None
        if not isinstance(found, torch.Tensor):
            raise ConfigError(f"field {field!r} of the model's output is a {type(found).__name__}, not a tensor; fix {option}")
        return found
    if isinstance(output, torch.Tensor):
        return output
    named = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(named, torch.Tensor):
        return named
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        f"the model returned {_describe(output)}, and the logits are not a tensor, a 'logits' field or the first "
        f"element of a tuple; name the output that holds them with {option}"
    )


def _describe(output) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(str, list(output)[:6]))}"
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return f"a {type(output).__name__} with fields {', '.join(output._fields)}"
    if isinstance(output, (tuple, list)):
        kinds = ", ".join(type(o).__name__ for o in output[:6])
        return f"a {type(output).__name__} of ({kinds})"
    return f"a {type(output).__name__}"


# ------------------------------------------------------------------------------------------- dtype


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point dtype most of ``model``'s parameter values have (``torch.float32`` for a model
    without floating-point parameters).  A model converted with ``.to(torch.bfloat16)`` gives
    ``torch.bfloat16``; the input batches must be cast to it (see :func:`cast_like_model`)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return torch.float32
    return max(counts, key=counts.__getitem__)


def cast_like_model(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to the model's dtype when both are floating point (integer inputs, e.g. token ids or
    uint8 images a model converts itself, are left alone)."""
    if x.is_floating_point() and dtype.is_floating_point and x.dtype != dtype:
        return x.to(dtype)
    return x


def to_float32(model: nn.Module) -> torch.dtype | None:
    """Convert a half/bfloat16 model to float32 in place, for training and pruning (optimiser updates
    in 16-bit weights are mostly lost to rounding); returns the dtype to give the exported model back
    (:func:`restore_dtype`), or ``None`` when the model was float32 already."""
    dtype = model_dtype(model)
    if dtype in (torch.float16, torch.bfloat16):
        model.float()
        return dtype
    return None


def restore_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Give ``model`` back the dtype :func:`to_float32` took from it (no-op for ``None``)."""
    return model.to(dtype) if dtype is not None else model


# --------------------------------------------------------------------------------------- divergence


def diverged_loss_limit(num_classes: int | None) -> float:
    """A cross-entropy above this is divergence, not a bad step: ``max(1000, 100 * ln(num_classes))``.

    Chance level is ``ln(num_classes)`` (2.3 for 10 classes); a loss of 1000 needs logits about 1000
    apart in the wrong direction, which no model that is learning produces.
    """
    return max(1000.0, 100.0 * math.log(max(num_classes or 2, 2)))


def divergence(loss: float, *, num_classes: int | None = None, logits: torch.Tensor | None = None) -> str | None:
    """Why training has diverged, or ``None``: a non-finite loss, non-finite logits, or a loss above
    :func:`diverged_loss_limit`.  (One host sync per call: on accelerators call it every few steps.)"""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if logits is not None and not bool(torch.isfinite(logits).all()):
        return "the model's outputs became non-finite (NaN or infinity)"
    limit = diverged_loss_limit(num_classes)
    if loss > limit:
        return f"the loss blew up to {loss:.3g} (over {limit:.0f}; chance level is about {math.log(max(num_classes or 2, 2)):.2f})"
    return None


def nonfinite_tensors(model: nn.Module, limit: int = 5) -> list[str]:
    """Names of (at most ``limit``) parameters and buffers holding NaN or infinity: divergence shows in
    the weights before the loss when the loss is computed in a lower precision or masked."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


# ----------------------------------------------------------------------------------- dense stages


@dataclass(frozen=True)
class DenseStages:
    """Whether the dense stages run, and the one line that says why (for the log and the report)."""

    premin: bool
    train: bool
    note: str


def dense_stages(pretrained: bool, *, epochs: int | None, recipe_epochs: int, premin_steps: int) -> DenseStages:
    """The rule for a model that arrives with trained weights (a checkpoint, ``--weights``, a pretrained
    torchvision/timm model): CS pre-minimisation never runs (it rewrites trained kernels), and dense
    training runs only when the user asked for epochs explicitly (``epochs``, e.g. ``--epochs N``);
    the report's dense row is then the given model evaluated on the data.  A model without weights
    follows the recipe (``recipe_epochs``, ``premin_steps``)."""
    if not pretrained:
        train_epochs = recipe_epochs if epochs is None else epochs
        return DenseStages(premin_steps > 0, train_epochs > 0, "the model starts from random weights: pre-minimisation and dense training as the recipe says")
    if epochs:
        return DenseStages(False, True, f"the model arrived with trained weights: pre-minimisation skipped, trained {epochs} more epoch(s) as asked")
    return DenseStages(False, False, "the model arrived with trained weights: pre-minimisation and dense training skipped; the dense row is this model evaluated on the data")


__all__ = [
    "DenseStages", "cast_like_model", "dense_stages", "divergence", "diverged_loss_limit", "logits_of",
    "model_dtype", "nonfinite_tensors", "restore_dtype", "to_float32",
]
