"""Passes over a few training batches that prepare a model without training it: batch-norm statistics
after pruning, and task-loss gradients for data-driven importance criteria (Taylor)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.adapt import logits_of
from . import distributed
from .device import Precision, resolve_precision, to_device


def first_batches(loader: Iterable, batches: int, prec: Precision) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches`` batches of ``loader``, moved to the device and layout of ``prec``: the one
    batch loop of every calibration pass (BN re-estimation, gradients, compensation statistics)."""
    for used, (x, y) in enumerate(loader):
        if used >= batches:
            return
        yield to_device(x, y, prec)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50, prec: Precision | None = None,
                   keep: Iterable[nn.Module] = ()) -> int:
    """Re-estimate batch-norm running statistics on ``batches`` training batches (no gradients).

    Pruning removes channels that fed later layers, so the running means/variances recorded for the
    dense model no longer describe the pruned model's activations; without this, accuracy right after
    pruning says more about stale statistics than about which channels were kept.  Returns the number
    of batches used (0 if the model has no batch norm).  The norms in ``keep`` keep their statistics (they
    run in eval mode through the pass): those a refit already set (:func:`~convsim_shrink.prune.compensation.refit_to_dense`).

    Under ``torchrun`` every rank reads ``batches`` batches of its shard and the statistics are then
    averaged over the ranks (each rank's batches weigh the same), so every rank holds the same model.
    """
    kept = {id(m) for m in keep}
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in kept]
    if not norms:
        return 0
    device = next(model.parameters()).device
    prec = prec or resolve_precision(device, "fp32", False)
    saved = [(m.momentum, m.training) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for m in model.modules():
        if id(m) in kept:
            m.eval()
    used = 0
    try:
        for x, _ in first_batches(loader, batches, prec):
            with prec.autocast():
                model(x)
            used += 1
    finally:
        for m, (momentum, _) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    distributed.average_buffers(model)
    return used


def accumulate_gradients(model: nn.Module, loader: Iterable, batches: int, prec: Precision | None = None) -> int:
    """Task-loss gradients summed over the first ``batches`` batches of ``loader`` (train mode, fp32),
    for data-driven importance criteria (Taylor).  Clears old gradients first; returns the batches used.

    Under ``torchrun`` each rank sums over its own shard and the gradients are then averaged over the
    ranks: with the global batch split over the ranks, that is the single-process sum, and every rank
    scores channels on the same gradients."""
    prec = prec or resolve_precision(next(model.parameters()).device, "fp32", False)
    model.zero_grad(set_to_none=True)
    model.train()
    used = 0
    for x, y in first_batches(loader, batches, prec):
        F.cross_entropy(logits_of(model(x)).float(), y).backward()
        used += 1
    if used == 0:
        raise ConfigError("the training data gave no batch to compute the criterion's gradients on; add images or lower the batch size")
    distributed.average_gradients(model)
    return used
