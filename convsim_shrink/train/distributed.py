"""Several processes, one run: PyTorch's own distributed stack (``torchrun``, ``torch.distributed``,
DistributedDataParallel, ``DistributedSampler``) and the few hooks the pipeline needs around it.

* :func:`session` starts the process group when the process was started by ``torchrun`` (``WORLD_SIZE``
  > 1 in the environment): NCCL on CUDA, gloo on the CPU, with a timeout so that a rank that dies or
  stalls stops the others with an error instead of a hang; each process binds ``cuda:LOCAL_RANK``
  (:func:`bind_device`).  Ranks other than 0 print nothing: rank 0 speaks and writes for all.
* :func:`wrap` puts a model under DistributedDataParallel (optionally with SyncBatchNorm) and
  :func:`unwrap_after_training` undoes it; :func:`broadcast_buffers` gives every rank rank 0's BN
  statistics before an evaluation.
* :func:`average_gradients`, :func:`average_buffers`: calibration passes (Taylor gradients, BN
  re-estimation) all-reduced, so every rank scores and prunes the same model.
* :func:`agree_on_model` checks after a stage that every rank holds the same architecture and copies
  rank 0's values to all; :func:`from_rank0` makes a measurement (latency) rank 0's on every rank;
  :func:`agree` turns an error on any rank into the same error on every rank.

Starting the processes (the command line's ``--nproc``) is :mod:`convsim_shrink.launch`'s.

Without an initialised process group every helper answers as for a single process and does nothing.
Messages between ranks are JSON in byte tensors: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ConvSimError

#: seconds a process waits for the others (collectives, barriers) unless the recipe says otherwise
DEFAULT_TIMEOUT_S = 1800.0


# ------------------------------------------------------------------------------ who am I


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else 1


def is_main_process() -> bool:
    """Rank 0: the process that shows progress and writes files."""
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (``RANK``; 0 when not started by it)."""
    return int(os.environ.get("RANK", "0") or 0)


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher setting its environment) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def describe(global_batch: int, device: torch.device) -> dict[str, Any]:
    """What the run records about its processes: ``world_size``, ``backend`` (``none`` without a
    process group), ``global_batch`` (``train.batch_size``) and ``per_process_batch``."""
    n = world_size()
    return {
        "world_size": n,
        "backend": torch.distributed.get_backend() if _initialised() else "none",
        "global_batch": global_batch,
        "per_process_batch": global_batch // n,
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---------------------------------------------------------------------------- the session


def bind_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` a CUDA device becomes this process's own GPU, ``cuda:LOCAL_RANK`` (made the
    current device); any other device is returned as it is.  Raises :class:`ConfigError` when the node
    has fewer GPUs than processes."""
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        raise ConfigError(
            f"process {local} of this node needs cuda:{local} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most that many processes per node (--nproc_per_node)"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """The process group of a ``torchrun`` start, for the duration of the block.

    Does nothing when the process was not started by ``torchrun`` (:func:`launched`) or when the
    caller already initialised a group (then it is the caller's to destroy).  Otherwise (also for one
    process under torchrun, which then trains under DistributedDataParallel as several would)
    initialises ``torch.distributed`` from torchrun's environment
    (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...) with :func:`backend_for` ``device`` and a timeout of
    ``timeout_s`` seconds for every collective, silences the console off rank 0, and destroys the group
    when the block ends, also on an error.
    """
    if not launched() or _initialised():
        yield
        return
    from ..console import console

    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the NCCL communicator to this process's GPU
    torch.distributed.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    quiet = console.quiet
    console.quiet = quiet or not is_main_process()
    try:
        yield
        # leave together, so that no rank starts another group while one still holds this one's store
        torch.distributed.barrier()
    finally:
        console.quiet = quiet
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    if _initialised() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------- messages


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (anything JSON can hold), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    dev = _comm_device()
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([len(data)], device=dev))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: len(data)] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=dev) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode("utf-8")) for p, s in zip(parts, sizes)]


def broadcast_json(obj: Any) -> Any:
    """Rank 0's ``obj`` (anything JSON can hold) on every rank."""
    return all_gather_json(obj if is_main_process() else None)[0]


def agree(error: ConvSimError | None) -> None:
    """Raise on every rank if any rank has an error: the first failing rank's error type and message
    (prefixed by its rank when that is not 0), so that rank 0 can report it in one line."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    gathered = all_gather_json(None if error is None else [type(error).__name__, str(error)])
    for r, item in enumerate(gathered):
        if item is not None:
            if r == rank() and error is not None:
                raise error
            from .. import errors

            cls = getattr(errors, item[0], ConvSimError)
            cls = cls if isinstance(cls, type) and issubclass(cls, ConvSimError) else ConvSimError
            raise cls(item[1] if r == 0 else f"process {r}: {item[1]}")


def any_rank(flag: bool | torch.Tensor) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if bool(flag) else 0.0], device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums over the ranks of a few numbers (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or _comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (through the backend's device), and return it."""
    if world_size() == 1:
        return t
    buf = t.to(_comm_device())
    torch.distributed.all_reduce(buf)
    t.copy_(buf.to(t.device))
    return t


def from_rank0(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` measured on rank 0 only, its value (seconds, a float, or anything with a ``seconds``
    attribute) handed to every rank: measurements such as latency differ from process to process, and
    a decision taken on them must be the same everywhere.  Rank 0 gets ``fn``'s own return value."""
    if world_size() == 1:
        return fn

    def measured(*args, **kwargs):
        value = fn(*args, **kwargs) if is_main_process() else None
        seconds = float(getattr(value, "seconds", value)) if value is not None else 0.0
        t = torch.tensor([seconds], dtype=torch.float64, device=_comm_device())
        torch.distributed.broadcast(t, 0)
        return value if is_main_process() else float(t.item())

    return measured


# ---------------------------------------------------------------------------- tensors


def average_gradients(model: nn.Module) -> None:
    """Replace every parameter's gradient by its mean over the ranks (a rank without a gradient adds
    zeros), so that gradient-based importance scores are the same on every rank."""
    if world_size() == 1:
        return
    for p in unwrap(model).parameters():
        if not p.requires_grad:
            continue
        has = any_rank(p.grad is not None)
        if not has:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world_size())


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BN running mean / variance) over the ranks; integer buffers
    (``num_batches_tracked``) are taken from rank 0."""
    if world_size() == 1:
        return
    for b in unwrap(model).buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(world_size())
        else:
            torch.distributed.broadcast(b, 0)


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN statistics): DistributedDataParallel broadcasts them at the
    start of each forward, so after the last training step each rank holds its own update."""
    if world_size() == 1:
        return
    for b in unwrap(model).buffers():
        torch.distributed.broadcast(b, 0)


def _architecture(model: nn.Module) -> list:
    return [[name, list(t.shape), str(t.dtype)] for name, t in unwrap(model).state_dict().items()]


@torch.no_grad()
def agree_on_model(model: nn.Module, what: str = "the model") -> None:
    """Check that every rank holds the same architecture (names, shapes and dtypes of the state dict;
    a stage that decided differently on some rank is a bug) and copy rank 0's parameters and buffers to
    every rank.  Raises :class:`ConvSimError` on a mismatch."""
    if world_size() == 1:
        return
    shapes = all_gather_json(_architecture(model))
    differ = [r for r, s in enumerate(shapes) if s != shapes[0]]
    if differ:
        raise ConvSimError(
            f"{what} differs between process 0 and process(es) {', '.join(map(str, differ))} after a stage; "
            "this is a bug, please report it with the recipe"
        )
    for t in unwrap(model).state_dict().values():
        torch.distributed.broadcast(t, 0)


# --------------------------------------------------------------------- DDP and SyncBN


def check_setup(recipe, device: torch.device, processes: int | None = None) -> None:
    """What a run of ``processes`` (default: as started) needs from the recipe: the global batches
    (``train.batch_size``, ``finetune.batch_size``) divide by the number of processes, and SyncBatchNorm runs on CUDA only.
    Raises :class:`ConfigError`."""
    n = processes or world_size()
    if n <= 1:
        return
    for section in ("train", "finetune"):
        b = getattr(recipe, section).batch_size
        if b is not None and b % n:
            up = -(-b // n) * n
            raise ConfigError(
                f"{section}.batch_size={b} is the global batch and must divide by the {n} processes; "
                f"use --set {section}.batch_size={up} (or {max(n, b - b % n)})"
            )
    if device.type != "cuda" and (recipe.train.sync_bn or recipe.finetune.sync_bn):
        raise ConfigError("sync_bn=true needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); drop --set train.sync_bn=true on the CPU")


def wrap(model: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """``model`` under DistributedDataParallel (its BatchNorm layers converted to SyncBatchNorm in place
    when ``sync_bn`` and there are several processes), or ``model`` itself without a process group."""
    if not _initialised():
        return model
    if sync_bn and world_size() > 1:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of ``nn.SyncBatchNorm.convert_sync_batchnorm``: every SyncBatchNorm becomes a
    BatchNorm2d sharing its parameters and buffers, so that pruning and export see plain layers.  In
    place; returns ``module`` (or its replacement when it is itself a SyncBatchNorm)."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def unwrap_after_training(model: nn.Module) -> None:
    """After :func:`wrap`: SyncBatchNorm back to BatchNorm and rank 0's buffers on every rank."""
    if world_size() == 1:
        return
    revert_sync_batchnorm(model)
    broadcast_buffers(model)
