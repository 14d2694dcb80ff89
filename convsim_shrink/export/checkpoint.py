"""Exported models that load back without surprises.

The native format is one ``.safetensors`` file: the weights, plus a metadata header holding JSON for
the architecture spec (registered model name and arguments, and the shape attributes of every layer
that pruning changed), the input shape the model was made for, the recipe, the metrics and the library
versions.  :func:`load` rebuilds the
model from the spec and loads the weights; nothing is ever unpickled.

Models that did not come from the registry (any ``nn.Module`` given to the Python API) export to
TorchScript and ONNX, and to a full ``torch.save`` pickle that :func:`load` opens only with
``trust_pickle=True``.
"""

from __future__ import annotations

import json
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ConvSimError
from ..io import atomic_path, atomic_torch_save, atomic_write_bytes
from ..models import SPEC_ATTR, create_model

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
        raise CheckpointError(f"{path} is not a readable safetensors file ({_short(exc)}); it is corrupt, truncated or of another format") from None
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


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__


def _apply_shapes(model: nn.Module, layers: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
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


def load(path: str | Path, *, map_location: str | torch.device = "cpu", trust_pickle: bool = False) -> nn.Module:
    """Load an exported model.

    * ``.safetensors`` (the native format): rebuilt from its spec, weights loaded; nothing unpickled.
    * TorchScript archives: ``torch.jit.load``.
    * a full ``torch.save`` pickle of a module: only with ``trust_pickle=True`` (it can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        return _load_zip(path, map_location, trust_pickle)
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated")
    meta = read_metadata(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as exc:
        raise CheckpointError(f"{path}: the weights are unreadable ({_short(exc)}); the file is corrupt or truncated") from None
    spec = meta["spec"]
    try:
        if spec.get("source", "zoo") == "zoo":
            model = create_model(spec["name"], **spec["kwargs"])
        else:
            from ..sources import rebuild

            model = rebuild(spec)
    except ConvSimError as exc:
        raise CheckpointError(f"{path} describes a model this version cannot build: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} describes a model this version cannot build ({_short(exc)})") from None
    _apply_shapes(model, spec.get("layers", {}), tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the described architecture ({_short(exc)})") from None
    model.convsim_export = {k: meta[k] for k in ("recipe", "metrics", "versions")}
    return model.to(map_location).eval()


def _load_zip(path: Path, map_location, trust_pickle: bool) -> nn.Module:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("/archive_format") for n in names):  # a torch.export program (pt2)
        from .deploy import load_pt2

        return load_pt2(path)  # runs as exported (eval); torch 2.14 refuses .eval() on it
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):  # a TorchScript archive
        try:
            return torch.jit.load(str(path), map_location=map_location).eval()
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({_short(exc)})") from None
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


def export_torchscript(model: nn.Module, path: str | Path, example_inputs: torch.Tensor) -> Path:
    path = Path(path)
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example_inputs)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path


def export_onnx(model: nn.Module, path: str | Path, example_inputs: torch.Tensor, opset: int = 17) -> Path:
    """ONNX with a dynamic batch axis (input ``input``, output ``logits``)."""
    path = Path(path)
    model = model.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_inputs,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def onnx_max_difference(model: nn.Module, path: str | Path, inputs: torch.Tensor) -> float:
    """Max |ONNX Runtime output - PyTorch output| on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    got = session.run(None, {"input": inputs.numpy()})[0]
    return float(abs(got - expected).max())
