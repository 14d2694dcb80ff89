"""What the shrunk model runs as: measured latency, int8 ONNX, and ``torch.export`` programs.

* :func:`measure_latency` times a model's forward pass (eval mode, no autograd, CUDA synchronised):
  the median of repeated runs after warm-up, with the spread (interquartile range / median) that
  says how far to trust it.  :func:`latency_meter` makes the callable that the pruning search
  (``pruning.prune_to_target(target_latency=...)``) re-measures candidates with.
* :func:`quantize_onnx_int8` turns an fp32 ONNX export into a static int8 one with onnxruntime's
  quantization tools (QDQ format, per-channel weights, activation ranges calibrated on training
  images); :func:`evaluate_onnx` measures its top-1 and :func:`onnx_latency` its speed under
  onnxruntime.  :func:`check_int8_supported` is the preflight to call before any training.
* :func:`export_pt2` saves a ``torch.export`` ExportedProgram (dynamic batch dimension) and checks it
  against the eager model.

Nothing here changes ``torch.set_num_threads``: the thread count is the user's.
"""

from __future__ import annotations

import copy
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_bytes
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


def _summarise(times: Sequence[float], batch_size: int, device: str, precision: str) -> Latency:
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
    was_training = model.training
    timed.eval()
    times = []
    try:
        with torch.inference_mode(), prec.autocast():
            for _ in range(warmup):
                timed(x)
            _sync(device)
            for _ in range(repeats):
                t0 = time.perf_counter()
                timed(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(prec.dtype, str(prec.dtype))
    return _summarise(times, len(x), str(device), dtype + (", channels_last" if channels_last else ""))


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
) -> dict[str, Latency]:
    """Several models timed side by side: ``rounds`` rounds, each timing every model in turn for
    ``repeats / rounds`` runs, so that drift on a shared machine hits all of them alike. Each model's
    :class:`Latency` pools its runs from every round (``repeats`` in all, rounded up)."""
    per_round = max(1, -(-repeats // rounds))
    times: dict[str, list[float]] = {name: [] for name in models}
    last: dict[str, Latency] = {}
    for _ in range(rounds):
        for name, model in models.items():
            last[name] = measure_latency(model, inputs, batch_size, device=device, precision=precision, warmup=warmup, repeats=per_round)
            times[name].extend(last[name].times)
    return {name: _summarise(times[name], last[name].batch_size, last[name].device, last[name].precision) for name in models}


def speed_rows(
    dense: nn.Module,
    shrunk: nn.Module,
    inputs: torch.Tensor | Sequence[int],
    batch_sizes: Sequence[int] = (1, 128),
    **kwargs,
) -> list[dict]:
    """Dense vs shrunk latency at each batch size (:func:`compare_latency`; keyword arguments go to it),
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


# ---------------------------------------------------------------------------------------- int8 ONNX


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_settings() -> dict:
    """onnxruntime's recommended static-quantization types for this CPU (``quantize_static``'s docstring,
    "Choosing parameters for CPU inference"): x86 without VNNI: uint8 activations, int8 weights,
    ``reduce_range`` (7-bit weights, avoids saturating 16-bit accumulation); x86 with VNNI: the same without
    ``reduce_range``; ARM: int8 activations and weights."""
    from onnxruntime.quantization import QuantType

    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "reduce_range": False}
    vnni = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": not vnni}


def _tiny_onnx(path: Path) -> None:
    """A one-conv ONNX model built with onnx.helper (no torch export), for the int8 preflight."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["logits"])],
        "preflight",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def check_int8_supported() -> None:
    """Raise :class:`ConfigError` (one line) unless onnxruntime can quantize and run an int8 model here.

    Imports onnx and onnxruntime's quantization tools, then quantizes a one-conv model built in memory
    (QDQ, per-channel, two calibration batches) and runs it on onnxruntime's CPU provider: about 0.1 s.
    Call it before training when ``export.formats`` holds ``onnx-int8``.
    """
    try:
        import numpy as np
        import onnx  # noqa: F401
        import onnxruntime as ort
        from onnxruntime.quantization import (  # noqa: F401
            CalibrationDataReader,
            QuantFormat,
            quantize_static,
        )
    except ImportError as exc:
        raise ConfigError(
            f"export format onnx-int8 needs onnx and onnxruntime with its quantization tools ({exc}); "
            "install them with pip install 'convsim-shrink[onnx]' or drop onnx-int8 from export.formats"
        ) from None
    if "CPUExecutionProvider" not in ort.get_available_providers():
        raise ConfigError("export format onnx-int8: this onnxruntime build has no CPU execution provider; install the standard onnxruntime package")
    try:
        with tempfile.TemporaryDirectory(prefix="convsim-int8-") as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            _tiny_onnx(fp32)
            rng = np.random.default_rng(0)
            quantize_onnx_int8(fp32, int8, [torch.from_numpy(rng.standard_normal((2, 1, 8, 8)).astype(np.float32)) for _ in range(2)])
            _session(int8).run(None, {"input": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)})
    except Exception as exc:  # any failure means int8 export would fail after training
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"export format onnx-int8: onnxruntime cannot quantize for this platform ({platform.machine()}: {first}); "
            "drop onnx-int8 from export.formats"
        ) from None


class _Calibration:
    """onnxruntime's ``CalibrationDataReader`` protocol over batches held in memory: ``{"input": array}``."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.index = 0

    def get_next(self) -> dict | None:
        if self.index >= len(self.arrays):
            return None
        self.index += 1
        return {"input": self.arrays[self.index - 1]}


def _calibration_arrays(batches: Iterable, images: int) -> list:
    """The first ``images`` images of ``batches`` (tensors or ``(images, labels)`` pairs) as float32 arrays."""
    arrays, seen = [], 0
    for batch in batches:
        if seen >= images:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x[: images - seen].detach().float().cpu().contiguous()
        arrays.append(x.numpy())
        seen += len(x)
    return arrays


def _opset(path: Path) -> int:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(exc).__name__}); export it again") from None
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def quantize_onnx_int8(
    fp32_onnx_path: str | Path,
    out_path: str | Path,
    calibration_batches: Iterable,
    *,
    images: int = 300,
    per_channel: bool = True,
    preprocess: bool = True,
) -> Path:
    """Static post-training int8 quantization of an fp32 ONNX model with onnxruntime's tools.

    ``calibration_batches``: an iterable of image batches (N, C, H, W) or ``(images, labels)`` pairs,
    normalised as the model expects; the first ``images`` images calibrate the activation ranges
    (MinMax). The model's input must be named ``input`` (as ``checkpoint.export_onnx`` names it).
    Steps: ``quant_pre_process`` (shape inference and graph optimisation, which onnxruntime recommends
    before quantizing), then ``quantize_static`` in QDQ format with per-channel weights and the types
    of :func:`int8_settings`. Written atomically to ``out_path``; returns it.

    Raises :class:`CheckpointError` when the fp32 model is missing or the calibration data is empty.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_onnx_path, out_path = Path(fp32_onnx_path), Path(out_path)
    if not fp32_onnx_path.is_file():
        raise CheckpointError(f"{fp32_onnx_path} does not exist; export the fp32 ONNX model first")
    opset = _opset(fp32_onnx_path)
    if per_channel and opset < 13:
        raise CheckpointError(f"{fp32_onnx_path} has opset {opset}; per-channel int8 needs opset 13 or newer: export with opset >= 13")
    arrays = _calibration_arrays(calibration_batches, images)
    if not arrays:
        raise CheckpointError("int8 calibration got no images: the calibration loader is empty")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
        source = fp32_onnx_path
        if preprocess:
            source = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_onnx_path), str(source), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(source), str(quantized), _Calibration(arrays), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            **int8_settings(),
        )
        os.replace(quantized, out_path)
    return out_path


def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # the same thread count as torch, so fp32 / int8 / torch timings compare like with like
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def evaluate_onnx(path: str | Path, loader: Iterable, *, threads: int | None = None) -> float:
    """Top-1 accuracy (percent) of an ONNX model under onnxruntime's CPU provider over ``loader``'s
    ``(images, labels)`` batches (fed as they come; input name ``input``)."""
    session = _session(path, threads)
    correct = seen = 0
    for x, y in loader:
        logits = session.run(None, {"input": x.detach().float().cpu().contiguous().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y.cpu()).sum())
        seen += len(y)
    return 100.0 * correct / max(seen, 1)


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
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, x)
    per_round = max(1, -(-repeats // rounds))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                session.run(None, x)
                times[name].append(time.perf_counter() - t0)
    return {name: _summarise(t, len(x["input"]), "cpu (onnxruntime)", "onnx") for name, t in times.items()}


def qdq_node_counts(path: str | Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes (and which other ops) an ONNX graph holds."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def calibration_view(loader: Iterable) -> Iterable:
    """The same images without augmentation, in a fixed order, for calibration: a new ``TensorLoader``
    in evaluation mode when ``loader`` is an augmenting one, else ``loader`` itself."""
    from ..data import TensorLoader

    if isinstance(loader, TensorLoader) and loader.augment:
        return TensorLoader(loader.images.cpu(), loader.labels.cpu(), loader.info, batch_size=loader.batch_size, train=False)
    return loader


@dataclass(frozen=True)
class Int8Export:
    path: Path  # the int8 ONNX model
    fp32_path: Path | None  # the fp32 ONNX model it was quantized from, when it was kept
    top1_fp32: float  # percent, onnxruntime, the test loader
    top1_int8: float
    calibration_images: int
    seconds: float  # wall time of export, quantization and both evaluations

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "fp32_path": str(self.fp32_path) if self.fp32_path else None,
            "top1_fp32": self.top1_fp32, "top1_int8": self.top1_int8, "calibration_images": self.calibration_images,
            "seconds": self.seconds,
        }


def export_onnx_int8(
    model: nn.Module,
    out_dir: str | Path,
    example_inputs: torch.Tensor,
    calibration_loader: Iterable,
    test_loader: Iterable,
    *,
    images: int = 300,
    opset: int = 17,
    fp32_path: str | Path | None = None,
    name: str = "model.int8.onnx",
) -> Int8Export:
    """The export stage's int8 step: ``out_dir/name`` quantized from the fp32 ONNX model at ``fp32_path``
    (when the run already wrote one) or from a temporary export of ``model`` (opset ``opset``, at least 13),
    calibrated on the first ``images`` images of ``calibration_loader`` (unaugmented: :func:`calibration_view`),
    with both models' top-1 on ``test_loader`` under onnxruntime.
    """
    from .checkpoint import export_onnx

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out = out_dir / name
    arrays = _calibration_arrays(calibration_view(calibration_loader), images)
    with tempfile.TemporaryDirectory(prefix="convsim-int8-") as tmp:
        if fp32_path is not None:
            source = Path(fp32_path)
        else:
            was_training = model.training
            on_cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
            try:
                source = export_onnx(on_cpu, Path(tmp) / "fp32.onnx", example_inputs.cpu(), opset=max(opset, 13))
            finally:
                model.train(was_training)
        quantize_onnx_int8(source, out, [torch.from_numpy(a) for a in arrays], images=images)
        top1_fp32 = evaluate_onnx(source, test_loader)
    top1_int8 = evaluate_onnx(out, test_loader)
    used = sum(len(a) for a in arrays)
    return Int8Export(out, Path(fp32_path) if fp32_path is not None else None, top1_fp32, top1_int8, used, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- pt2


def export_pt2(model: nn.Module, path: str | Path, example_inputs: torch.Tensor, *, dynamic_batch: bool = True) -> float:
    """Save ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``), load it back and
    return the max |loaded - eager| output difference.

    The batch dimension is dynamic (``torch.export.Dim``, 1 to 65536) unless ``dynamic_batch`` is
    False; the check runs ``example_inputs`` and, when dynamic, a seeded batch of a different size.
    The program is exported from the model in eval mode (batch norm uses its running statistics), on
    the model's device. Written atomically (``io.atomic_write_bytes``: a temporary file, then ``os.replace``).

    Raises :class:`CheckpointError` when ``torch.export`` cannot capture the model.
    """
    path = Path(path)
    device = next(model.parameters()).device
    x = example_inputs.to(device)
    was_training = model.training
    model.eval()
    try:
        dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
        # torch.export specialises a dimension of size 1, so a dynamic batch is traced with two rows
        traced = make_batch(x, 2) if dynamic_batch and len(x) == 1 else x
        try:
            program = torch.export.export(model, (traced,), dynamic_shapes=dynamic)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"torch.export cannot capture this model ({type(exc).__name__}: {first}); use the onnx or convsim format") from None
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        loaded = load_pt2(path)
        checks = [x]
        if dynamic_batch:
            g = torch.Generator().manual_seed(0)
            checks.append(torch.randn(len(x) + 2, *x.shape[1:], generator=g).to(device))
        diff = 0.0
        with torch.no_grad():
            for xi in checks:
                diff = max(diff, float((loaded(xi) - model(xi)).abs().max()))
        return diff
    finally:
        model.train(was_training)


def load_pt2(path: str | Path) -> nn.Module:
    """The callable module of an ExportedProgram saved by :func:`export_pt2` (``torch.export.load``).

    It runs as it was exported (eval mode: batch norm uses its running statistics); torch 2.14 raises
    ``NotImplementedError`` on ``.eval()``/``.train()`` of such a module, so do not call them.

    Raises :class:`CheckpointError` when the file is missing or not a readable ExportedProgram.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch.export program ({first}); re-export it") from None
