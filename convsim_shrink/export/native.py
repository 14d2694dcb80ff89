"""The native export format (``convsim``): models that load back without surprises.

It is one ``.safetensors`` file: the weights, plus a metadata header holding JSON for
the architecture spec (registered model name and arguments, and the shape attributes of every layer
that pruning changed), the input shape the model was made for, the recipe, the metrics and the library
versions.  :func:`load` rebuilds the
model from the spec and loads the weights; nothing is ever unpickled.

Models that did not come from the registry (any ``nn.Module`` given to the Python API) are written as
a full ``torch.save`` pickle (:func:`save_full`) that :func:`~convsim_shrink.export.load.load` opens only
with ``trust_pickle=True``; they also export to the other formats (:mod:`.registry`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ConvSimError, first_line
from ..io import atomic_torch_save, atomic_write_bytes
from ..models import SPEC_ATTR
from ..sources import rebuild
from .registry import ExportJob, Written

FORMAT = "convsim-shrink/1"
_SHAPE_ATTRS = (
    "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
    "num_channels", "num_groups", "normalized_shape",
)


def versions() -> dict[str, str]:
    import torch_pruning
    import torchvision

    return {
        "convsim_shrink": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "python": platform.python_version(),
    }


def architecture_spec(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``: its registry entry and every layer's shape attributes."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise CheckpointError(
            "this model was not built by convsim_shrink.create_model or convsim_shrink.sources.resolve_source, so the "
            "pickle-free format cannot rebuild it; export it with formats torchscript/onnx, or save_full(..) and load it "
            "with trust_pickle=True"
        )
    layers = {}
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), (int, tuple))}
        if attrs:
            layers[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    # zoo models: {"name", "kwargs"}; other sources add "source" and what rebuilds them (sources.rebuild)
    return {**{k: v for k, v in spec.items() if k != "layers"}, "layers": layers}


def save(
    model: nn.Module,
    path: str | Path,
    *,
    recipe: dict | None = None,
    metrics: dict | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
) -> Path:
    """Write ``model`` in the pickle-free format (atomically).

    ``input_shape``: one input's shape without the batch axis, e.g. ``(1, 28, 28)``; recorded in the
    header so that exporting the file later needs no guess (:func:`input_shape`).
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    spec = architecture_spec(model)
    # cloned: safetensors refuses views and shared storage, which pruning can leave behind
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "spec": json.dumps(spec),
        "recipe": json.dumps(recipe or {}),
        "metrics": json.dumps(metrics or {}),
        "versions": json.dumps(versions()),
    }
    if input_shape is not None:
        metadata["input_shape"] = json.dumps([int(d) for d in input_shape])
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an exported model (spec, recipe, metrics, versions, and ``input_shape`` when
    the file records it), without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}); it is corrupt, truncated or of another format") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a convsim-shrink export (no '{FORMAT}' header)")
    try:
        out = {k: json.loads(meta[k]) for k in ("spec", "recipe", "metrics", "versions")}
        if "input_shape" in meta:
            out["input_shape"] = json.loads(meta["input_shape"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a damaged convsim-shrink header; re-export the model") from None
    return out


def input_shape(path: str | Path, meta: dict[str, Any] | None = None) -> tuple[int, ...]:
    """The input shape (without the batch axis) recorded in an export's header.

    Raises :class:`CheckpointError` for files written before the shape was recorded: the shape is
    then given by hand (``convsim-shrink export --input-shape C,H,W``) rather than guessed.
    """
    meta = read_metadata(path) if meta is None else meta
    shape = meta.get("input_shape")
    if not shape:
        raise CheckpointError(
            f"{path} does not record its input shape (it was saved by an older convsim-shrink); "
            "give it as --input-shape C,H,W (e.g. 1,28,28 for Fashion-MNIST, 3,32,32 for CIFAR)"
        )
    return tuple(int(d) for d in shape)


def apply_shapes(model: nn.Module, layers: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, attrs in layers.items():
        if name not in modules:
            raise CheckpointError(f"the export names a layer '{name}' that the rebuilt model does not have")
        for k, v in attrs.items():
            setattr(modules[name], k, tuple(v) if isinstance(v, list) else v)
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise CheckpointError(f"the export holds '{key}' but the rebuilt model has no layer '{owner}'")
        if leaf in module._parameters and module._parameters[leaf] is not None:
            if module._parameters[leaf].shape != value.shape:
                module._parameters[leaf] = nn.Parameter(torch.empty_like(value), requires_grad=module._parameters[leaf].requires_grad)
        elif leaf in module._buffers and module._buffers[leaf] is not None:
            if module._buffers[leaf].shape != value.shape:
                module._buffers[leaf] = torch.empty_like(value)


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a native ``.safetensors`` export: the model is rebuilt from its spec (a zoo model by
    ``create_model``, other sources by :func:`~convsim_shrink.sources.rebuild`) and the weights are
    loaded; nothing is unpickled.  The export's recipe, metrics and versions are attached as
    ``model.convsim_export``.  Raises :class:`CheckpointError` for a missing, truncated, foreign or
    damaged file, or one describing a model this version cannot build."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size < 8:
        raise CheckpointError(f"{path} is empty or truncated")
    meta = read_metadata(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as exc:
        raise CheckpointError(f"{path}: the weights are unreadable ({first_line(exc)}); the file is corrupt or truncated") from None
    spec = meta["spec"]
    try:
        model = rebuild(spec)
    except ConvSimError as exc:
        raise CheckpointError(f"{path} describes a model this version cannot build: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} describes a model this version cannot build ({first_line(exc)})") from None
    apply_shapes(model, spec.get("layers", {}), tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the described architecture ({first_line(exc)})") from None
    model.convsim_export = {k: meta[k] for k in ("recipe", "metrics", "versions")}
    return model.to(map_location).eval()


def load_pickle(path: str | Path, *, map_location: str | torch.device = "cpu", trust_pickle: bool = False) -> nn.Module:
    """A module saved whole by :func:`save_full` (or ``torch.save``): read with ``weights_only`` first,
    unpickled only with ``trust_pickle=True`` (unpickling can run code).  Raises :class:`CheckpointError`
    for an untrusted pickle or a file that holds something other than a module."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} is a pickled model that can run code when loaded; load it only if you trust its source: "
                "convsim_shrink.load(path, trust_pickle=True)"
            ) from None
        obj = torch.load(path, map_location=map_location, weights_only=False)
    if isinstance(obj, nn.Module):
        return obj.eval()
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__} (a state dict or training checkpoint?), not a model; "
        "export the model with `convsim-shrink export` or load the state dict into a model yourself"
    )


def save_full(model: nn.Module, path: str | Path) -> Path:
    """A full ``torch.save`` of the module (for models outside the registry); reading it unpickles code."""
    path = Path(path)
    atomic_torch_save(model, path)
    return path


def write(job: ExportJob) -> Written:
    """The export stage's ``convsim`` format: ``model.safetensors`` with the recipe, the metrics and the
    input shape in its header; a model from outside the registry becomes a full pickle ``model.pt``
    (listed as ``pickle``)."""
    if getattr(job.model, SPEC_ATTR, None) is None:
        return Written(save_full(job.model, job.path.with_suffix(".pt")), "pickle")
    path = save(job.model, job.path, recipe=job.recipe, metrics=job.metrics, input_shape=tuple(job.example_inputs.shape[1:]))
    return Written(path, "convsim")


def check(opset: int = 17) -> None:
    """Nothing beyond safetensors, which the preflight imports."""
