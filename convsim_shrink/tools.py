"""The library side of the command line's model tools: ``evaluate``, ``export`` and ``inspect``.

Each function takes a saved model (or a model name), does the torch work and returns plain results
that the CLI prints; user mistakes raise :class:`~convsim_shrink.errors.ConvSimError` subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import INFO, DataBundle, build_data, sample_batch
from .errors import ConfigError, DataNotFoundError, unknown
from .export import native
from .export.load import load
from .recipe import DataConfig


def _data_for(meta: dict, data: str | None, data_dir: str | Path | None, batch_size: int, subset: int | None) -> DataBundle:
    """The test data of a saved model: ``data`` if given, else the data set its recipe names."""
    saved = (meta.get("recipe") or {}).get("data", {})
    cfg = DataConfig(
        name=data or saved.get("name", "fashion-mnist"), dir=str(data_dir) if data_dir else saved.get("dir"),
        test_subset=subset, augment=False,
    )
    return build_data(cfg, batch_size=batch_size)


def _metadata(path: Path) -> dict:
    return native.read_metadata(path) if path.suffix == ".safetensors" else {}


@dataclass
class Evaluation:
    accuracy: float  # top-1, percent
    loss: float  # mean cross-entropy
    images: int
    dataset: str


def evaluate_file(
    path: str | Path,
    *,
    data: str | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
    subset: int | None = None,
    device: str | None = None,
) -> Evaluation:
    """Top-1 accuracy (fp32) of a saved model (``.safetensors`` or TorchScript) on a data set's test split
    (by default the one its recipe names; ``subset``: a class-balanced slice of that many images)."""
    from .train import evaluate, resolve_device, resolve_precision

    path = Path(path)
    model = load(path)
    bundle = _data_for(_metadata(path), data, data_dir, batch_size, subset)
    dev = resolve_device(device or "auto")
    model.to(dev)
    result = evaluate(model, bundle.test, resolve_precision(dev, "fp32", False))
    return Evaluation(result["acc"], result["loss"], bundle.test.num_samples, bundle.info.name)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``: one input's shape without the batch axis."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 1 or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape '{text}' is not a shape; give positive sizes without the batch axis, e.g. 1,28,28")
    return shape


@dataclass
class ExportedFile:
    path: Path
    checks: dict = field(default_factory=dict)  # what the format measured of the file (report fields)
    note: str | None = None  # one line for the command line

    @property
    def onnx_max_abs_diff(self) -> float | None:
        return self.checks.get("onnx_max_abs_diff")


def export_file(
    path: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    *,
    opset: int = 17,
    input_shape: tuple[int, ...] | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    int8_calibration: int = 300,
) -> ExportedFile:
    """Export a saved model (``.safetensors``) to any registered format (:mod:`convsim_shrink.export.registry`:
    ``convsim``, ``onnx``, ``onnx-int8``, ``pt2``, ``torchscript``), written and checked as the export stage
    does, next to it (``model.onnx`` for ``model.safetensors``, ``model.int8.onnx``, ``model.pt2``,
    ``model.ts``) unless ``out`` is given.  The input shape comes from the file's header; ``input_shape``
    (without the batch axis) overrides it and is needed for files saved before the header recorded it.
    ``onnx-int8`` calibrates on ``int8_calibration`` training images of ``data`` (default: the data set the
    file's recipe names) and measures both models' top-1 on its test split.

    Raises :class:`~convsim_shrink.errors.ConfigError` for an unknown format (before anything is read),
    :class:`~convsim_shrink.errors.CheckpointError` for an unreadable file or a missing input shape.
    """
    from .export.registry import FORMATS, ExportJob

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not supported; use {', '.join(FORMATS)}")
    chosen = FORMATS[fmt]
    path = Path(path)
    model = load(path)
    meta = _metadata(path)
    shape = input_shape or native.input_shape(path, meta or None)
    bundle = _data_for(meta, data, data_dir, 256, None) if chosen.needs_data else None
    target = Path(out) if out else path.with_name(path.stem + chosen.suffix)
    job = ExportJob(model, target, torch.randn(1, *shape), opset=opset, recipe=meta.get("recipe"), metrics=meta.get("metrics"),
                    data=bundle, int8_calibration=int8_calibration)
    done = chosen.implementation().write(job)
    return ExportedFile(done.path, done.checks, done.note)


@dataclass
class LayerRow:
    name: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    groups: int
    cs: float  # normalized Convolutional Similarity of the layer's filters
    feature_similarity: float | None  # mean |cos| between channels' feature maps on real images


@dataclass
class Inspection:
    layers: list[LayerRow] = field(default_factory=list)
    params: int = 0
    total_cs: float = 0.0
    note: str | None = None  # why the feature-map similarity is missing


def _model_for(target: str, data: str | None, width: float) -> tuple[nn.Module, str]:
    """A saved model (path) or a freshly built registry model (name), and the data set it is for."""
    from .models import create_model

    data_name = data or "fashion-mnist"
    if Path(target).suffix in (".safetensors", ".ts", ".pt") or Path(target).is_file():
        model = load(target)
        if Path(target).suffix == ".safetensors":
            data_name = data or (native.read_metadata(target).get("recipe") or {}).get("data", {}).get("name", data_name)
        return model, data_name
    if data_name not in INFO:
        raise unknown("data set", data_name, INFO)
    info = INFO[data_name]
    return create_model(target, num_classes=max(info.num_classes, 1), in_channels=info.in_channels, width=width), data_name


def inspect_model(
    target: str,
    *,
    data: str | None = None,
    data_dir: str | Path | None = None,
    images: int = 256,
    width: float = 1.0,
) -> Inspection:
    """Per conv layer of a saved model or a registry model name: channels, normalized CS and (with
    ``images`` > 0 real test images, when the data set is found) feature-map similarity."""
    from .cs.redundancy import feature_map_similarity
    from .cs.similarity import conv_layers, conv_similarity

    model, data_name = _model_for(target, data, width)
    result = Inspection(params=sum(p.numel() for p in model.parameters()))
    fm: dict = {}
    if images:
        try:
            cfg = DataConfig(name=data_name, dir=str(data_dir) if data_dir else None, test_subset=max(images, 10), augment=False)
            fm = feature_map_similarity(model, sample_batch(build_data(cfg, batch_size=64).test, images))
        except DataNotFoundError as exc:
            result.note = f"no feature-map similarity: {exc}"
    with torch.no_grad():
        for name, m in conv_layers(model):
            cs = float(conv_similarity(m.weight, normalized=True, groups=m.groups))
            result.total_cs += cs
            sim = fm[name]["similarity"] if name in fm else None
            result.layers.append(LayerRow(name, m.in_channels, m.out_channels, tuple(m.kernel_size), m.groups, cs, sim))
    return result
