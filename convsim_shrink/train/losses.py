"""Extra loss terms added to the task loss: the CS regulariser and distillation.

A term is a callable ``(model, x, y, logits) -> loss`` (a scalar tensor); the loop adds it to the task
loss outside autocast and reports its running mean under the term's ``__name__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cs.similarity import model_conv_similarity
from ..models.adapt import logits_of
from .device import Precision, set_memory_format
from .distributed import unwrap

LossTerm = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def every_kth_call(term: LossTerm, every: int, name: str) -> LossTerm:
    """``term`` evaluated on calls 1, k+1, 2k+1, ... only (``k = every``) and multiplied by ``k`` there, an
    fp32 zero on the calls between: the same loss on average at 1/k of the term's cost.  The count starts
    when this is called (a resumed stage starts it again).  Raises ``ValueError`` for ``every < 1``."""
    if every < 1:
        raise ValueError(f"{name} every={every}: must be at least 1")
    if every == 1:
        term.__name__ = name
        return term
    calls = {"n": 0}

    def sometimes(model, x, y, logits):
        calls["n"] += 1
        if (calls["n"] - 1) % every:
            return logits.new_zeros((), dtype=torch.float32)
        return every * term(model, x, y, logits)

    sometimes.__name__ = name
    return sometimes


def cs_regularizer(beta: float, *, normalized: bool = True, channels: str = "same", every: int = 1) -> LossTerm:
    """``beta * CS(model)``, the paper's regulariser (on unit-norm filters by default, so that it cannot
    be lowered by shrinking weights that batch norm rescales anyway).

    ``every=k`` applies ``k * beta * CS`` on every k-th step only (:func:`every_kth_call`): the same pull on
    average (the term changes slowly next to the task gradient) at 1/k of its cost.
    """

    def term(model, x, y, logits):
        return beta * model_conv_similarity(unwrap(model), normalized=normalized, channels=channels)

    return every_kth_call(term, every, "cs")


def distillation(
    teacher: nn.Module, weight: float, temperature: float = 4.0, *, prec: Precision | None = None, every: int = 1
) -> LossTerm:
    """``weight * T² * KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al., 2015).

    ``every=k`` runs the teacher on every k-th call only (the first, the (k+1)-th, ...) and returns ``k``
    times the term there, zero between (:func:`every_kth_call`): the same objective on average at 1/k of
    the teacher's cost.

    The teacher runs in inference mode (no autograd bookkeeping), at the engine's precision ``prec``
    (its autocast; its memory format: ``teacher`` is put in channels_last in place when ``prec`` says so,
    like the batches it is given); without ``prec`` in fp32 and as it is.  ``x``: the student's batch,
    ``logits``: the student's ``(N, classes)`` scores.
    """
    teacher.eval()
    if prec is not None and prec.channels_last:
        set_memory_format(teacher, True)
    autocast = prec.autocast if prec is not None else contextlib.nullcontext
    t = temperature

    def term(model, x, y, logits):
        with torch.inference_mode(), autocast():
            target = F.log_softmax(logits_of(teacher(x)).float() / t, 1)
        target = target.clone()  # an ordinary tensor: autograd keeps it for the backward pass of kl_div
        kl = F.kl_div(F.log_softmax(logits.float() / t, 1), target, log_target=True, reduction="batchmean")
        return weight * t * t * kl

    return every_kth_call(term, every, "kd")
