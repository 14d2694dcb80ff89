"""How fast a model runs: measured latency of torch models and of ONNX files under onnxruntime.

* :func:`measure_latency` times a model's forward pass (eval mode, no autograd, CUDA synchronised):
  the median of repeated runs after warm-up, with the spread (interquartile range / median) that
  says how far to trust it.  :func:`latency_meter` makes the callable that the target search
  (:mod:`convsim_shrink.prune.search`, ``target_latency``) re-measures candidates with;
  :func:`speed_rows` is the report's dense-versus-shrunk table.
* :func:`onnx_latency` / :func:`compare_onnx_latency` time ONNX files under onnxruntime's CPU provider.

Nothing here changes ``torch.set_num_threads``: the thread count is the user's.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..export.onnx import session
from ..models import evaluating
from ..train import Precision, resolve_precision

# IQR / median above which a latency is reported as unreliable. A judgement, not yet checked on an idle
# machine: on the shared 2-core CPU under load (load average 9-14, 2026-11-29, benchmarks/bench_deploy.py on
# ResNet18 width 0.25) onnxruntime's timings spread 7-10% with one thread, torch's 5-90%.
SPREAD_LIMIT = 0.15


# ------------------------------------------------------------------------------------------ latency


@dataclass(frozen=True)
class Latency:
    """Timed forward passes of one model at one batch size.

    ``seconds`` is the median over ``times`` (seconds per batch); ``spread`` is the interquartile range
    of ``times`` divided by the median (0 = perfectly steady).
    """

    seconds: float
    spread: float
    times: tuple[float, ...]
    batch_size: int
    device: str
    precision: str

    @property
    def ms(self) -> float:
        return 1000.0 * self.seconds

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds

    def spread_warning(self, limit: float = SPREAD_LIMIT) -> str | None:
        """One line when the timings are too noisy to trust (e.g. a shared, busy machine), else None."""
        if self.spread <= limit:
            return None
        return (
            f"latency at batch {self.batch_size} on {self.device} varies by {100 * self.spread:.0f}% between repeats "
            f"(interquartile range / median, limit {100 * limit:.0f}%): the device looks busy or shared, so latency "
            "ratios may be off by about that much; measure on an idle device or raise the repeats"
        )

    def to_dict(self) -> dict:
        return {
            "seconds": self.seconds, "spread": self.spread, "batch_size": self.batch_size, "repeats": len(self.times),
            "device": self.device, "precision": self.precision, "images_per_second": self.images_per_second,
        }


def summarise(times: Sequence[float], batch_size: int, device: str, precision: str) -> Latency:
    times = tuple(float(t) for t in times)
    median = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4, method="inclusive")
        spread = (q[2] - q[0]) / median if median > 0 else 0.0
    else:
        spread = (max(times) - min(times)) / median if median > 0 else 0.0
    return Latency(median, spread, times, batch_size, device, precision)


def make_batch(inputs: torch.Tensor | Sequence[int], batch_size: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """A batch of ``batch_size`` inputs.

    ``inputs`` is a tensor (its rows are reused, tiled when there are fewer than ``batch_size``) or the
    shape of one input without the batch dimension, e.g. ``(1, 28, 28)`` (seeded standard-normal values;
    a leading 1 is taken as a batch dimension only when ``inputs`` has 4 entries).
    """
    if isinstance(inputs, torch.Tensor):
        x = inputs.detach()
        if batch_size is None or batch_size == len(x):
            return x
        reps = -(-batch_size // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size]
    shape = tuple(int(s) for s in inputs)
    if len(shape) == 4:
        shape = shape[1:]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size or 1, *shape, generator=g)


def _precision_of(device: torch.device, precision: str | Precision) -> Precision:
    if isinstance(precision, Precision):
        return precision
    # contiguous memory by default: how a user runs the exported model
    return resolve_precision(device, precision, channels_last=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[int],
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "fp32",
    warmup: int = 3,
    repeats: int = 20,
) -> Latency:
    """Median seconds per forward pass of ``model`` on a batch of ``batch_size``.

    ``inputs``: example inputs (N, C, H, W) or the shape of one input (C, H, W); see :func:`make_batch`.
    ``device``: where to time (default: where the model's parameters are; a model elsewhere is timed
    as a copy). ``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or an engine ``Precision`` (autocast
    dtype, memory format); strings time contiguous tensors, as the exported model runs.
    The model runs in eval mode under ``torch.inference_mode`` after ``warmup`` untimed passes; each of
    the ``repeats`` passes is timed alone, with the device synchronised before and after (CUDA, MPS).
    The model's train/eval mode is restored.

    Raises :class:`ConfigError` when ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"latency needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    params = next(model.parameters(), None)
    own_device = params.device if params is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else own_device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    prec = _precision_of(device, precision)
    x = make_batch(inputs, batch_size).to(device)
    channels_last = prec.channels_last and x.dim() == 4
    timed = model
    if own_device != device or channels_last:  # time a copy: the caller's model stays as it is
        timed = copy.deepcopy(model).to(device)
        if channels_last:
            timed = timed.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with evaluating(timed), torch.inference_mode(), prec.autocast():  # the caller's mode is restored
        for _ in range(warmup):
            timed(x)
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            timed(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(prec.dtype, str(prec.dtype))
    return summarise(times, len(x), str(device), dtype + (", channels_last" if channels_last else ""))


def latency_meter(
    inputs: torch.Tensor | Sequence[int],
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "fp32",
    warmup: int = 3,
    repeats: int = 10,
) -> Callable[[nn.Module], Latency]:
    """``model -> Latency`` with fixed settings: what ``prune_to_target(latency_fn=...)`` calls once per
    candidate (and a few more times on the dense model and the winner)."""

    def meter(model: nn.Module) -> Latency:
        return measure_latency(model, inputs, batch_size, device=device, precision=precision, warmup=warmup, repeats=repeats)

    return meter


def compare_latency(
    models: dict[str, nn.Module],
    inputs: torch.Tensor | Sequence[int],
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str | Precision = "fp32",
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 4,
    time_budget: float | None = None,
) -> dict[str, Latency]:
    """Several models timed side by side: ``rounds`` rounds, each timing every model in turn for
    ``repeats / rounds`` runs, so that drift on a shared machine hits all of them alike. Each model's
    :class:`Latency` pools its runs from every round (``repeats`` in all, rounded up).

    ``time_budget`` (seconds, optional): first one untimed pass of each model (the warm-up) estimates a
    pass's cost, then the repeats are cut so that the timed passes fit the budget (never below 3 per
    model) and no further warm-up runs; a fast model keeps every repeat."""
    if time_budget is not None:
        slowest = max(measure_latency(m, inputs, batch_size, device=device, precision=precision, warmup=0, repeats=1).seconds
                      for m in models.values())
        fit = int(time_budget / (len(models) * max(slowest, 1e-9)))
        repeats, warmup = max(3, min(repeats, fit)), 0
        rounds = min(rounds, repeats)
    per_round = max(1, -(-repeats // rounds))
    times: dict[str, list[float]] = {name: [] for name in models}
    last: dict[str, Latency] = {}
    for _ in range(rounds):
        for name, model in models.items():
            last[name] = measure_latency(model, inputs, batch_size, device=device, precision=precision, warmup=warmup, repeats=per_round)
            times[name].extend(last[name].times)
    return {name: summarise(times[name], last[name].batch_size, last[name].device, last[name].precision) for name in models}


def speed_rows(
    dense: nn.Module,
    shrunk: nn.Module,
    inputs: torch.Tensor | Sequence[int],
    batch_sizes: Sequence[int] = (1, 128),
    **kwargs,
) -> list[dict]:
    """Dense vs shrunk latency at each batch size (:func:`compare_latency`; keyword arguments go to it,
    ``time_budget`` per batch size included),
    as JSON-ready rows for a report: ``batch``, ``dense_ms``, ``shrunk_ms``, ``speedup`` (dense / shrunk),
    ``spread`` (the wider of the two) and ``warning`` (a line, or None)."""
    rows = []
    for batch in dict.fromkeys(batch_sizes):  # each batch size once, in order
        lat = compare_latency({"dense": dense, "shrunk": shrunk}, inputs, batch, **kwargs)
        d, s = lat["dense"], lat["shrunk"]
        noisier = max(d, s, key=lambda x: x.spread)
        rows.append({
            "batch": batch, "dense_ms": d.ms, "shrunk_ms": s.ms, "speedup": d.seconds / s.seconds,
            "spread": noisier.spread, "device": d.device, "precision": d.precision, "warning": noisier.spread_warning(),
        })
    return rows


# ------------------------------------------------------------------------------------ onnxruntime


def onnx_latency(
    path: str | Path, inputs: torch.Tensor | Sequence[int], batch_size: int | None = None, *,
    warmup: int = 3, repeats: int = 20, threads: int | None = None,
) -> Latency:
    """Median seconds per ``session.run`` of an ONNX model on a batch (onnxruntime, CPU provider)."""
    return compare_onnx_latency({"model": path}, inputs, batch_size, warmup=warmup, repeats=repeats, rounds=1, threads=threads)["model"]


def compare_onnx_latency(
    paths: dict[str, str | Path],
    inputs: torch.Tensor | Sequence[int],
    batch_size: int | None = None,
    *,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 4,
    threads: int | None = None,
) -> dict[str, Latency]:
    """Several ONNX models timed side by side under onnxruntime (one session each, taking turns for
    ``rounds`` rounds, as :func:`compare_latency` does for torch models)."""
    x = {"input": make_batch(inputs, batch_size).float().contiguous().numpy()}
    sessions = {name: session(path, threads) for name, path in paths.items()}
    for ort_session in sessions.values():
        for _ in range(warmup):
            ort_session.run(None, x)
    per_round = max(1, -(-repeats // rounds))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, ort_session in sessions.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                ort_session.run(None, x)
                times[name].append(time.perf_counter() - t0)
    return {name: summarise(t, len(x["input"]), "cpu (onnxruntime)", "onnx") for name, t in times.items()}
