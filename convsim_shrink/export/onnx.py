"""The ``onnx`` export format (``model.onnx``, dynamic batch axis, input ``input``, output ``logits``),
checked against onnxruntime, and the onnxruntime sessions the int8 format and the benchmarks run."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError, first_line
from ..io import atomic_path
from .registry import ExportJob, Written


def _export(model: nn.Module, target, example_inputs: torch.Tensor, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_inputs,), target, dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_onnx(model: nn.Module, path: str | Path, example_inputs: torch.Tensor, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis (input ``input``, output ``logits``), traced in eval mode on
    ``example_inputs`` (N, C, H, W) and written atomically to ``path``."""
    path = Path(path)
    model = model.eval()
    with atomic_path(path) as tmp:
        _export(model, str(tmp), example_inputs, opset)
    return path


def session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU provider with ``threads`` intra-op threads (default:
    torch's thread count, so fp32 / int8 / torch timings compare like with like)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel:
    """An ONNX file loaded back under onnxruntime: called on a batch (N, C, H, W) tensor it returns the
    logits as a tensor."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = session(path, threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def onnx_max_difference(model: nn.Module, path: str | Path, inputs: torch.Tensor) -> float:
    """Max |ONNX Runtime output - PyTorch output| on ``inputs``."""
    import onnxruntime as ort

    ort_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    got = ort_session.run(None, {"input": inputs.numpy()})[0]
    return float(abs(got - expected).max())


def evaluate_onnx(path: str | Path, loader: Iterable, *, threads: int | None = None) -> float:
    """Top-1 accuracy (percent) of an ONNX model under onnxruntime's CPU provider over ``loader``'s
    ``(images, labels)`` batches (fed as they come; input name ``input``)."""
    model = OnnxRuntimeModel(path, threads)
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y.cpu()).sum())
        seen += len(y)
    return 100.0 * correct / max(seen, 1)


def qdq_node_counts(path: str | Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes (and which other ops) an ONNX graph holds."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def write(job: ExportJob) -> Written:
    """``model.onnx`` at ``job.opset``, and its max output difference to the eager model on four random
    inputs when onnxruntime is installed (report field ``onnx_max_abs_diff``)."""
    path = export_onnx(job.model, job.path, job.example_inputs, opset=job.opset)
    try:
        diff = onnx_max_difference(job.model, path, torch.randn(4, *job.example_inputs.shape[1:]))
    except ImportError:
        return Written(path, "onnx")
    return Written(path, "onnx", {"onnx_max_abs_diff": diff}, f"onnxruntime max abs difference {diff:.2e}")


def load(path: str | Path) -> OnnxRuntimeModel:
    return OnnxRuntimeModel(path)


def newest_opset() -> int | None:
    """The newest ONNX opset this torch's exporter writes (None when torch does not say)."""
    import torch.onnx

    constants = getattr(torch.onnx, "_constants", None)
    return getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)


def check(opset: int = 17) -> None:
    """``opset`` is one this torch writes, and a tiny model exports at it and runs through onnxruntime,
    in memory.  Raises :class:`ConfigError` (opset) or :class:`MissingDependencyError` (it does not work)."""
    newest = newest_opset()
    if newest is not None and opset > newest:
        raise ConfigError(f"export.opset={opset} is newer than this torch writes (up to {newest}); use --set export.opset={newest}")
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval()
    x = torch.zeros(2, 1, 8, 8)
    buffer = io.BytesIO()
    try:
        _export(tiny, buffer, x, opset)
        session(buffer.getvalue()).run(None, {"input": x.numpy()})
    except Exception as exc:  # noqa: BLE001 - any failure here would fail the real export at the end
        raise MissingDependencyError(
            f"ONNX export does not work here at opset {opset} ({first_line(exc, 10_000, with_type=True)}); "
            "update onnx and onnxruntime (pip install -U onnx onnxruntime), lower export.opset, "
            "or drop onnx from export.formats"
        ) from None
