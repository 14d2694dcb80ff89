"""The one training loop that every stage reuses: ``fit`` = ``train_one_epoch`` + ``evaluate`` + checkpoints.

* Extra loss terms (the CS regulariser, distillation; :mod:`.losses`) are added to the task loss,
  computed outside autocast.
* A checkpoint is written atomically after every epoch (model, optimizer, step, epoch, RNG states,
  history, settings); ``resume=True`` continues from it.
* The logits are taken from the model's output by :func:`~convsim_shrink.models.adapt.logits_of`'s rule (a
  tensor, a ``logits`` field, or the first element of a tuple: GoogLeNet's training-mode named tuple,
  ``(logits, features)`` pairs).
* Divergence stops training where it happens, with :class:`~convsim_shrink.errors.TrainingDivergedError`
  saying what diverged (a non-finite or exploding loss, non-finite outputs, non-finite weights) and
  where (stage, epoch, step); the last good checkpoint stays in place.  A pruned model that cannot take
  its first step is reported as a bug in the pruning.  Training data that gives no batch is refused
  before the first step (never zero steps in silence).
* Under ``torchrun`` (an initialised process group, :mod:`.distributed`) the model is trained under
  DistributedDataParallel (SyncBatchNorm with ``sync_bn``) on loaders sharded by rank; losses,
  accuracies and divergence are summed / agreed over the ranks (every rank stops together), every rank
  evaluates on its share of the test set and the sums are all-reduced, and only rank 0 shows progress
  or writes files.
* The checkpoint also holds the AMP gradient scaler's state (fp16), so a resumed run keeps its scale.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn

from ..console import console
from ..errors import CheckpointError, ConfigError, TrainingDivergedError
from ..io import atomic_torch_save
from ..models.adapt import diverged_loss_limit, divergence, logits_of, nonfinite_tensors
from . import distributed
from .device import Precision, channels_last_hazard, resolve_precision, set_memory_format, to_device
from .distributed import is_main_process, unwrap, world_size
from .losses import LossTerm, cs_regularizer
from .optim import Schedule, make_optimizer, make_schedule
from .progress import duration_text, make_progress, print_finished, print_running

#: steps between host syncs of the running loss/accuracy on accelerators
_SYNC_EVERY = 32
#: steps between checks of every weight and buffer for NaN/infinity (also at an epoch's first and last
#: step); on the CPU the check costs about a tenth of a small model's step, and a non-finite parameter
#: shows in the next step's outputs anyway, which are checked every step there
_WEIGHTS_EVERY = 32
#: what to do when the logits cannot be found in a model's output
LOGITS_FIX = "a wrapper module whose forward returns the class scores as one (N, classes) tensor"


class _Diverged(TrainingDivergedError):
    """Raised inside an epoch (what and at which step); :func:`fit` adds the stage and epoch."""

    def __init__(self, reason: str, step: int, lr: float):
        super().__init__(f"{reason} by step {step} (lr {lr:.3g}); lower the learning rate (train.lr / finetune.lr) or the CS weight")
        self.reason, self.step, self.lr = reason, step, lr


def _backward_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    after_backward: Callable[[], None] | None,
) -> None:
    """Backward pass and optimizer step for one batch's ``loss`` (a scalar): scaled and unscaled by
    ``scaler`` (fp16) when there is one (unscaled before ``after_backward`` and clipping, which must see
    the true gradients; its step skips an update whose gradients overflowed), then ``after_backward``,
    clipping to a total norm of ``grad_clip`` (when set) and the step."""
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None and (grad_clip or after_backward is not None):
        scaler.unscale_(optimizer)
    if after_backward is not None:
        after_backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    prec: Precision,
    step: int = 0,
    label_smoothing: float = 0.0,
    task_weight: float = 1.0,
    extra: tuple[LossTerm, ...] = (),
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress=None,
    task=None,
    sync_every: int | None = None,
    after_backward: Callable[[], None] | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (metrics, next global step).

    ``after_backward``: called after every backward pass, with the gradients unscaled (fp16), before
    clipping and the optimizer step (a regulariser that edits gradients, e.g. group sparse training).

    On the CPU every step is checked for a non-finite loss at once.  On accelerators the running sums
    stay on the device and are read (one host sync) every ``_SYNC_EVERY`` steps, so the host can queue
    work ahead of the device; a non-finite loss is then reported at most that many steps late (the
    checkpoint on disk is still the last good one).  ``sync_every`` overrides that choice.  Every
    weight and buffer is checked for NaN/infinity at the epoch's first and last sync and at least every
    ``_WEIGHTS_EVERY`` steps between (a non-finite parameter shows in the next step's outputs anyway).
    """
    model.train()
    if sync_every is None:
        sync_every = 1 if prec.device.type == "cpu" else _SYNC_EVERY
    names = [getattr(t, "__name__", f"term{i}") for i, t in enumerate(extra)]
    zero = torch.zeros((), device=prec.device)
    run = {"loss": zero.clone(), "correct": zero.clone(), **{k: zero.clone() for k in names}}
    bad = torch.zeros((), dtype=torch.bool, device=prec.device)
    totals = {"loss": 0.0, "correct": 0.0, "seen": 0.0, **{k: 0.0 for k in names}}
    t0 = time.perf_counter()
    pending = 0
    unchecked = -1  # steps since the weights were last checked (-1: not yet this epoch)
    last = len(loader) - 1 + step if hasattr(loader, "__len__") else None

    def drain(last_step: int) -> None:
        nonlocal pending, unchecked
        values = torch.stack(list(run.values())).tolist()  # the one host sync
        for (k, t), v in zip(run.items(), values):
            totals[k] += v
            t.zero_()
        if distributed.any_rank(bad):  # every rank stops together
            raise _Diverged("the loss blew up, or the loss or the model's outputs became non-finite", last_step, lr)
        first, unchecked = unchecked < 0, max(unchecked, 0) + pending
        if first or unchecked >= _WEIGHTS_EVERY or last_step == last:
            unchecked = 0
            weights = nonfinite_tensors(model)
            if weights:
                raise _Diverged(f"weights became non-finite ({', '.join(weights)})", last_step, lr)
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress.update(
                task,
                advance=pending,
                info=f"loss {totals['loss'] / totals['seen']:.3f}  train acc {100 * totals['correct'] / totals['seen']:.1f}%  "
                f"{totals['seen'] / max(elapsed, 1e-9):.0f} img/s",
            )
            print_running(progress, task)
        pending = 0

    for x, y in loader:
        x, y = to_device(x, y, prec)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with prec.autocast():
            logits = logits_of(model(x), option=LOGITS_FIX)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        total = task_weight * loss
        for name, term in zip(names, extra):
            value = term(model, x, y, logits)
            run[name] += value.detach().float()
            total = total + value
        if sync_every == 1:  # the CPU: check every step, and say exactly what diverged
            reason = divergence(float(loss.detach()), num_classes=logits.shape[-1], logits=logits.detach())
            if reason is None and not bool(torch.isfinite(total.detach())):
                reason = f"an extra loss term ({', '.join(names)}) became non-finite"
            if reason is not None:
                raise _Diverged(reason, step, lr)
        else:
            limit = diverged_loss_limit(logits.shape[-1])
            bad |= ~torch.isfinite(total.detach()) | (loss.detach() > limit) | ~torch.isfinite(logits.detach()).all()
        optimizer.zero_grad(set_to_none=True)
        _backward_step(total, model, optimizer, scaler=scaler, grad_clip=grad_clip, after_backward=after_backward)
        step += 1
        n = len(y)
        run["loss"] += loss.detach().float() * n
        run["correct"] += (logits.detach().argmax(1) == y).sum()
        totals["seen"] += n
        pending += 1
        if pending >= sync_every:
            drain(step - 1)
    if pending:
        drain(step - 1)
    if unchecked > 0:  # a loader without a length: the epoch's last steps
        weights = nonfinite_tensors(model)
        if weights:
            raise _Diverged(f"weights became non-finite ({', '.join(weights)})", step - 1, lr)
    if world_size() > 1:  # the epoch's numbers over all ranks' images
        totals = dict(zip(totals, distributed.all_reduce_sum(list(totals.values()))))
        for k in names:
            totals[k] /= world_size()
    seen = max(totals["seen"], 1)
    metrics = {
        "train_loss": totals["loss"] / seen,
        "train_acc": 100 * totals["correct"] / seen,
        "images_per_s": totals["seen"] / max(time.perf_counter() - t0, 1e-9),
        "lr": schedule(max(step - 1, 0)),
    }
    metrics.update({f"train_{k}": totals[k] / max(len(loader), 1) for k in names})
    return metrics, step


def _diverged_message(stage: str, epoch: int, d: _Diverged, *, first_step: bool) -> str:
    """One line: what diverged, where, and what to do about it."""
    where = f"{stage} diverged at epoch {epoch}, step {d.step} (lr {d.lr:.3g}): {d.reason}"
    if first_step and (stage == "finetune" or stage.startswith("prune-step")):
        return (f"{where}; the pruned model cannot take its first training step, which is a bug in the pruning, "
                "not in your settings: please report it with the model")
    if first_step:
        return f"{where}; the model cannot take its first training step: check its outputs and the learning rate"
    return f"{where}; lower the learning rate (train.lr / finetune.lr) or the CS weight; the last good checkpoint is kept"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, prec: Precision | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over ``loader``; under ``torchrun`` over the
    union of every rank's ``loader`` (the sums are all-reduced), the same numbers on every rank."""
    prec = prec or resolve_precision(next(model.parameters()).device, "fp32", False)
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = to_device(x, y, prec)
        with prec.autocast():
            logits = logits_of(model(x), option=LOGITS_FIX).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if world_size() > 1:
        t = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=prec.device)
        torch.distributed.all_reduce(t)
        loss_sum, correct, seen = t.tolist()
    return {"acc": 100.0 * correct / max(seen, 1), "loss": loss_sum / max(seen, 1)}


def load_training_state(path: Path) -> dict:
    """A training checkpoint written by :func:`fit`, read without unpickling code (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # corrupt, truncated, or holding objects we refuse to unpickle
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start the stage again") from None


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def fit(
    model: nn.Module,
    train_loader,
    cfg,
    *,
    eval_loader=None,
    device: torch.device | None = None,
    extra: tuple[LossTerm, ...] = (),
    task_weight: float = 1.0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stage: str = "train",
    quiet: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (``cfg``: an ``OptimConfig``).

    ``cfg.cs_beta > 0`` adds the CS regulariser to ``extra``; ``after_backward`` is passed to
    :func:`train_one_epoch` (called on the gradients of every step).
    ``checkpoint``: file written atomically after every epoch; with ``resume`` an existing one is loaded
    first and training continues after its last finished epoch.  Returns the per-epoch history.
    """
    device = device or next(model.parameters()).device
    prec = resolve_precision(device, cfg.precision, cfg.channels_last)
    model.to(device)
    # the oneDNN fault is in the fp32 kernel (bf16 autocast trained the same conv without it)
    hazard = channels_last_hazard(model) if prec.channels_last and device.type == "cpu" and prec.dtype is None else None
    if hazard is not None:  # train contiguous rather than crash; say so where it was asked for
        if cfg.channels_last and not quiet:
            console.print(f"note: training {stage} contiguous, not channels_last: PyTorch's CPU convolutions crash "
                          f"in channels_last on {escape(hazard)}")
        prec = dataclasses.replace(prec, channels_last=False)
    if prec.channels_last:
        set_memory_format(model, True)  # 2-d kernels only: a Conv3d stays as it is
    if hasattr(train_loader, "to") and device.type != "cpu":
        train_loader.to(device)
        if eval_loader is not None and hasattr(eval_loader, "to"):
            eval_loader.to(device)
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule(cfg, max(1, len(train_loader)))
    scaler = torch.amp.GradScaler(device.type) if prec.scaler else None
    if getattr(cfg, "cs_beta", 0.0) > 0:
        extra = (*extra, cs_regularizer(cfg.cs_beta, normalized=cfg.cs_normalized, every=cfg.cs_every))
    result = FitResult()
    start_epoch, step = 0, 0
    ckpt = Path(checkpoint) if checkpoint else None
    settings = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(cfg)
    if resume and ckpt is not None and ckpt.is_file():
        state = load_training_state(ckpt)
        if state.get("stage") != stage:
            raise CheckpointError(f"{ckpt} belongs to stage '{state.get('stage')}', not '{stage}'")
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        result.history = list(state["history"])
        result.resumed_from_epoch = start_epoch
        torch.set_rng_state(state["rng"]["torch"])
    train_model = distributed.wrap(model, device, sync_bn=getattr(cfg, "sync_bn", False))
    if cfg.compile:
        train_model = torch.compile(train_model)

    if cfg.epochs > start_epoch and hasattr(train_loader, "__len__") and len(train_loader) == 0:
        raise ConfigError(f"{stage}: the training data gives no batch (is it empty, or smaller than a batch with drop_last?); add images or lower the batch size")
    t0 = time.perf_counter()
    with make_progress(quiet) as progress:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            task = progress.add_task(f"{stage} {epoch + 1}/{cfg.epochs}", total=len(train_loader), info="")
            first = step
            try:
                metrics, step = train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    schedule,
                    prec=prec,
                    step=step,
                    label_smoothing=cfg.label_smoothing,
                    task_weight=task_weight,
                    extra=extra,
                    grad_clip=cfg.grad_clip,
                    scaler=scaler,
                    progress=progress,
                    task=task,
                    after_backward=after_backward,
                )
            except _Diverged as d:
                raise TrainingDivergedError(_diverged_message(stage, epoch + 1, d, first_step=d.step == 0)) from None
            if step == first:
                raise ConfigError(f"{stage}: epoch {epoch + 1} took no training step (the training data gave no batch); add images or lower the batch size")
            metrics["epoch"] = epoch + 1
            distributed.broadcast_buffers(model)  # every rank evaluates and saves rank 0's BN statistics
            if eval_loader is not None:
                ev = evaluate(model, eval_loader, prec)
                metrics["val_acc"], metrics["val_loss"] = ev["acc"], ev["loss"]
                progress.update(task, info=progress.tasks[task].fields["info"] + f"  val acc {ev['acc']:.2f}%")
            left = cfg.epochs - epoch - 1
            if left:  # this stage's estimate, from the epochs this process ran so far
                eta = (time.perf_counter() - t0) / (epoch + 1 - start_epoch) * left
                progress.update(task, info=progress.tasks[task].fields["info"] + f"  {stage} ends in ~{duration_text(eta)}")
            print_finished(progress, task)
            result.history.append(metrics)
            if ckpt is not None and is_main_process():
                atomic_torch_save(
                    {
                        "stage": stage,
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "history": result.history,
                        "settings": settings,
                        "rng": {"torch": torch.get_rng_state()},
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "world_size": world_size(),
                    },
                    ckpt,
                )
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)
    result.seconds = time.perf_counter() - t0
    distributed.unwrap_after_training(model)
    result.final = result.history[-1] if result.history else {}
    if prec.channels_last:
        set_memory_format(model, False)
    return result
