"""The ``onnx-int8`` export format: a static int8 ONNX model (``model.int8.onnx``) quantized with
onnxruntime's tools, calibrated on training images, with both models' top-1 measured.

* :func:`quantize_onnx_int8` turns an fp32 ONNX export into a static int8 one (QDQ format, per-channel
  weights, activation ranges calibrated on training images, the types of :func:`int8_settings`).
* :func:`export_onnx_int8` is the export stage's step: quantize (from the run's fp32 ONNX file, or a
  temporary export), then measure both models' top-1 under onnxruntime.
* :func:`check` (:func:`check_int8_supported`) is the preflight to call before any training.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, first_line
from ..models import evaluating
from .onnx import OnnxRuntimeModel, evaluate_onnx, export_onnx, session
from .onnx import check as onnx_check
from .registry import ExportJob, Written


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
            "install them with pip install onnx onnxruntime or drop onnx-int8 from export.formats"
        ) from None
    if "CPUExecutionProvider" not in ort.get_available_providers():
        raise ConfigError("export format onnx-int8: this onnxruntime build has no CPU execution provider; install the standard onnxruntime package")
    try:
        with tempfile.TemporaryDirectory(prefix="convsim-int8-") as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            _tiny_onnx(fp32)
            rng = np.random.default_rng(0)
            quantize_onnx_int8(fp32, int8, [torch.from_numpy(rng.standard_normal((2, 1, 8, 8)).astype(np.float32)) for _ in range(2)])
            session(int8).run(None, {"input": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)})
    except Exception as exc:  # any failure means int8 export would fail after training
        raise ConfigError(
            f"export format onnx-int8: onnxruntime cannot quantize for this platform ({platform.machine()}: {first_line(exc, 200)}); "
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
    (MinMax). The model's input must be named ``input`` (as :func:`.onnx.export_onnx` names it).
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


def calibration_view(loader: Iterable) -> Iterable:
    """The same images without augmentation, in a fixed order, for calibration: the loader's
    ``unaugmented()`` view when it has one (our ``TensorLoader``), else ``loader`` itself."""
    unaugmented = getattr(loader, "unaugmented", None)
    return unaugmented() if callable(unaugmented) else loader


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
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out = out_dir / name
    arrays = _calibration_arrays(calibration_view(calibration_loader), images)
    with tempfile.TemporaryDirectory(prefix="convsim-int8-") as tmp:
        if fp32_path is not None:
            source = Path(fp32_path)
        else:
            on_cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
            with evaluating(model):  # exporting leaves the model in eval mode; its own mode is restored
                source = export_onnx(on_cpu, Path(tmp) / "fp32.onnx", example_inputs.cpu(), opset=max(opset, 13))
        quantize_onnx_int8(source, out, [torch.from_numpy(a) for a in arrays], images=images)
        top1_fp32 = evaluate_onnx(source, test_loader)
    top1_int8 = evaluate_onnx(out, test_loader)
    used = sum(len(a) for a in arrays)
    return Int8Export(out, Path(fp32_path) if fp32_path is not None else None, top1_fp32, top1_int8, used, time.perf_counter() - t0)


def write(job: ExportJob) -> Written:
    """``model.int8.onnx`` quantized from this export's fp32 ONNX file when it wrote one (else from a
    temporary export), calibrated on ``job.int8_calibration`` images of ``job.data.train``; report field
    ``int8`` (:meth:`Int8Export.to_dict`).  Raises :class:`ConfigError` without ``job.data``."""
    if job.data is None:
        raise ConfigError("the onnx-int8 export needs training images to calibrate on and a test set; pass data")
    done = export_onnx_int8(job.model, job.path.parent, job.example_inputs, job.data.train, job.data.test,
                            images=job.int8_calibration, opset=job.opset, fp32_path=job.written.get("onnx"), name=job.path.name)
    note = f"top-1 under onnxruntime: fp32 {done.top1_fp32:.2f}%, int8 {done.top1_int8:.2f}% ({done.calibration_images} calibration images)"
    return Written(done.path, "onnx-int8", {"int8": done.to_dict()}, note)


def load(path: str | Path) -> OnnxRuntimeModel:
    """The int8 model under onnxruntime (:class:`~convsim_shrink.export.onnx.OnnxRuntimeModel`)."""
    return OnnxRuntimeModel(path)


def check(opset: int = 17) -> None:
    """The ONNX export works at ``opset`` (:func:`convsim_shrink.export.onnx.check`: the int8 model is
    quantized from an fp32 export) and int8 works on this platform (:func:`check_int8_supported`)."""
    onnx_check(opset)
    check_int8_supported()
