"""The one training loop that every stage reuses: ``fit`` = ``train_one_epoch`` + ``evaluate`` + checkpoints.

* Fast by default per device: bf16 autocast on CPUs with native bf16 (AMX / AVX512-BF16) and
  channels_last; AMP (bf16, else fp16 with a gradient scaler) and channels_last on CUDA.
* Extra loss terms (the CS regulariser, distillation) are callables ``(model, x, y, logits) -> loss``
  added to the task loss, computed outside autocast.
* A checkpoint is written atomically after every epoch (model, optimizer, step, epoch, RNG states,
  history, settings); ``resume=True`` continues from it.  A non-finite loss stops with
  :class:`~convsim_shrink.errors.TrainingDivergedError` and leaves the last good checkpoint in place.
* Ready for ``torchrun``: with an initialised process group the model is wrapped in
  DistributedDataParallel, loaders shard by rank, and only rank 0 shows progress or writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, TrainingDivergedError
from .similarity import model_conv_similarity

LossTerm = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ environment


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """How a device runs: autocast dtype (None = fp32), gradient scaling, memory format."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        dt = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.device.type}, {dt}{', channels_last' if self.channels_last else ''}"


def resolve_precision(device: torch.device, precision: str = "auto", channels_last: bool | None = None) -> Precision:
    """The fastest correct settings for ``device`` unless ``precision`` says otherwise."""
    dtype: torch.dtype | None
    if precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if device.type == "cpu":
            raise ConfigError("fp16 autocast is not supported on the CPU here; use precision bf16 or fp32")
        dtype = torch.float16
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu":
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    else:
        dtype = None
    cl = device.type in ("cpu", "cuda") if channels_last is None else channels_last
    return Precision(device, dtype, scaler=dtype == torch.float16, channels_last=cl)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    """Learning rate per optimisation step: linear warm-up, then cosine, multistep or constant."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "multistep":
            return self.base_lr * self.gamma ** sum(t >= m for m in self.milestones)
        return self.base_lr


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW; no weight decay on biases and norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ------------------------------------------------------------------------------------ loss terms


def cs_regularizer(beta: float, *, normalized: bool = True, channels: str = "same", every: int = 1) -> LossTerm:
    """``beta * CS(model)``, the paper's regulariser (on unit-norm filters by default, so that it cannot
    be lowered by shrinking weights that batch norm rescales anyway).

    ``every=k`` applies ``k * beta * CS`` on every k-th step only: the same pull on average (the term
    changes slowly next to the task gradient) at 1/k of its cost.
    """
    calls = {"n": 0}

    def term(model, x, y, logits):
        calls["n"] += 1
        if (calls["n"] - 1) % every:
            return logits.new_zeros(())
        return (beta * every) * model_conv_similarity(_unwrap(model), normalized=normalized, channels=channels)

    term.__name__ = "cs"
    return term


def distillation(teacher: nn.Module, weight: float, temperature: float = 4.0) -> LossTerm:
    """``weight * T² * KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al., 2015)."""
    teacher.eval()

    def term(model, x, y, logits):
        with torch.no_grad():
            t_logits = teacher(x).float()
        t = temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(t_logits / t, 1), log_target=True, reduction="batchmean")
        return weight * t * t * kl

    term.__name__ = "kd"
    return term


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ------------------------------------------------------------------------------------ progress


def make_progress(quiet: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .console import console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet or not is_main_process(),
        transient=False,
    )


# ------------------------------------------------------------------------------------ loops


def _to_device(x, y, prec: Precision):
    x = x.to(prec.device, non_blocking=True)
    if prec.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(prec.device, non_blocking=True)


#: steps between host syncs of the running loss/accuracy on accelerators
_SYNC_EVERY = 32


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
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (metrics, next global step).

    On the CPU every step is checked for a non-finite loss at once.  On accelerators the running sums
    stay on the device and are read (one host sync) every ``_SYNC_EVERY`` steps, so the host can queue
    work ahead of the device; a non-finite loss is then reported at most that many steps late (the
    checkpoint on disk is still the last good one).  ``sync_every`` overrides that choice.
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

    def drain(last_step: int) -> None:
        nonlocal pending
        values = torch.stack(list(run.values())).tolist()  # the one host sync
        for (k, t), v in zip(run.items(), values):
            totals[k] += v
            t.zero_()
        if bool(bad):
            raise TrainingDivergedError(
                f"the loss became non-finite by step {last_step} (lr {lr:.3g}); lower the learning rate "
                f"(train.lr / finetune.lr) or the CS weight; the last good checkpoint is kept"
            )
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress.update(
                task,
                advance=pending,
                info=f"loss {totals['loss'] / totals['seen']:.3f}  acc {100 * totals['correct'] / totals['seen']:.1f}%  "
                f"{totals['seen'] / max(elapsed, 1e-9):.0f} img/s",
            )
        pending = 0

    for x, y in loader:
        x, y = _to_device(x, y, prec)
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with prec.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        total = task_weight * loss
        for name, term in zip(names, extra):
            value = term(model, x, y, logits)
            run[name] += value.detach().float()
            total = total + value
        bad |= ~torch.isfinite(total.detach())
        if sync_every == 1 and bool(bad):
            drain(step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
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
    seen = max(totals["seen"], 1)
    metrics = {
        "train_loss": totals["loss"] / seen,
        "train_acc": 100 * totals["correct"] / seen,
        "images_per_s": totals["seen"] / max(time.perf_counter() - t0, 1e-9),
        "lr": schedule(max(step - 1, 0)),
    }
    metrics.update({f"train_{k}": totals[k] / max(len(loader), 1) for k in names})
    return metrics, step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, prec: Precision | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over ``loader``."""
    prec = prec or resolve_precision(next(model.parameters()).device, "fp32", False)
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = _to_device(x, y, prec)
        with prec.autocast():
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if world_size() > 1:
        t = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=prec.device)
        torch.distributed.all_reduce(t)
        loss_sum, correct, seen = t.tolist()
    return {"acc": 100.0 * correct / max(seen, 1), "loss": loss_sum / max(seen, 1)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50, prec: Precision | None = None) -> int:
    """Re-estimate batch-norm running statistics on ``batches`` training batches (no gradients).

    Pruning removes channels that fed later layers, so the running means/variances recorded for the
    dense model no longer describe the pruned model's activations; without this, accuracy right after
    pruning says more about stale statistics than about which channels were kept.  Returns the number
    of batches used (0 if the model has no batch norm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
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
    used = 0
    try:
        for x, y in loader:
            if used >= batches:
                break
            x, _ = _to_device(x, y, prec)
            with prec.autocast():
                model(x)
            used += 1
    finally:
        for m, (momentum, _) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    return used


def accumulate_gradients(model: nn.Module, loader: Iterable, batches: int, prec: Precision | None = None) -> int:
    """Task-loss gradients summed over the first ``batches`` batches of ``loader`` (train mode, fp32),
    for data-driven importance criteria (Taylor).  Clears old gradients first; returns the batches used."""
    prec = prec or resolve_precision(next(model.parameters()).device, "fp32", False)
    model.zero_grad(set_to_none=True)
    model.train()
    used = 0
    for x, y in loader:
        if used >= batches:
            break
        x, y = _to_device(x, y, prec)
        F.cross_entropy(model(x), y).backward()
        used += 1
    return used


# ---------------------------------------------------------------------------------- checkpoints


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_training_state(path: Path) -> dict:
    """A training checkpoint written by :func:`fit`, read without unpickling code (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # corrupt, truncated, or holding objects we refuse to unpickle
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start the stage again") from None


# ---------------------------------------------------------------------------------------- fit


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
) -> FitResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (``cfg``: an ``OptimConfig``).

    ``cfg.cs_beta > 0`` adds the CS regulariser to ``extra``.
    ``checkpoint``: file written atomically after every epoch; with ``resume`` an existing one is loaded
    first and training continues after its last finished epoch.  Returns the per-epoch history.
    """
    device = device or next(model.parameters()).device
    prec = resolve_precision(device, cfg.precision, cfg.channels_last)
    model.to(device)
    if prec.channels_last:
        model.to(memory_format=torch.channels_last)
    if hasattr(train_loader, "to") and device.type != "cpu":
        train_loader.to(device)
        if eval_loader is not None and hasattr(eval_loader, "to"):
            eval_loader.to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = max(1, len(train_loader))
    schedule = Schedule(
        cfg.lr,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
        kind=cfg.schedule,
        milestones=tuple(cfg.milestones),
        gamma=cfg.gamma,
    )
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
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        result.history = list(state["history"])
        result.resumed_from_epoch = start_epoch
        torch.set_rng_state(state["rng"]["torch"])
    train_model: nn.Module = model
    if world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    t0 = time.perf_counter()
    with make_progress(quiet) as progress:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            task = progress.add_task(f"{stage} {epoch + 1}/{cfg.epochs}", total=len(train_loader), info="")
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
            )
            metrics["epoch"] = epoch + 1
            if eval_loader is not None:
                ev = evaluate(model, eval_loader, prec)
                metrics["val_acc"], metrics["val_loss"] = ev["acc"], ev["loss"]
                progress.update(task, info=progress.tasks[task].fields["info"] + f"  val {ev['acc']:.2f}%")
            result.history.append(metrics)
            if ckpt is not None and is_main_process():
                atomic_torch_save(
                    {
                        "stage": stage,
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "history": result.history,
                        "settings": settings,
                        "rng": {"torch": torch.get_rng_state()},
                    },
                    ckpt,
                )
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)
    result.seconds = time.perf_counter() - t0
    result.final = result.history[-1] if result.history else {}
    if prec.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return result
