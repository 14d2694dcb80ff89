"""What every model source shares: reading a weights file, loading it into a model whose output layers
or first conv differ, and replacing those layers for another number of classes or input channels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, first_line
from ..prune.safety.tracing import record_trace


def need(value: int | None, what: str) -> int:
    """``value``, or a ConfigError saying that ``what`` is needed to build the model."""
    if value is None:
        raise ConfigError(f"{what} is needed to build this model; give the data set (or --{what.replace('_', '-')})")
    return value


def is_file_spec(weights: str) -> bool:
    """Whether ``--weights`` names a file (an existing one, or a weights file's ending) rather than a download."""
    return Path(weights).expanduser().is_file() or weights.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a torch file read with ``weights_only=True``
    (accepting a bare state dict or one under ``state_dict``/``model``/``model_state_dict``; a
    ``module.`` prefix from DataParallel is dropped).  Raises CheckpointError (one line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc, with_type=True)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} could not be read with torch.load(weights_only=True) ({first_line(exc, with_type=True)}); it holds pickled objects "
                "beyond tensors: save model.state_dict() with torch.save or safetensors"
            ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors); save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, *, heads=(), stem: str | None = None) -> list[str]:
    """Load ``state`` into ``model``: the output layers (``heads``) may differ in shape (they stay
    freshly initialised) and the first conv (``stem``) in its input channels (adapted); any other
    mismatch raises CheckpointError listing a few keys.  Returns notes on what was adapted."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and own[k].shape != state[k].shape]
    notes: list[str] = []
    in_heads = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    fixed = {}
    for k in list(differ):
        if in_heads(k):
            differ.remove(k)
        elif stem is not None and k == f"{stem}.weight" and own[k].shape[0] == state[k].shape[0] and own[k].shape[2:] == state[k].shape[2:]:
            fixed[k] = adapt_input_channels(state[k], own[k].shape[1])
            differ.remove(k)
            notes.append(f"first conv adapted from {state[k].shape[1]} to {own[k].shape[1]} input channels")
    if missing or unexpected or differ:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        if differ:
            shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in differ[:3])
            parts.append(f"{len(differ)} of another shape ({shown}{', ...' if len(differ) > 3 else ''})")
        raise CheckpointError(f"the weights do not fit {what}: " + "; ".join(parts))
    if any(in_heads(k) and own[k].shape != state[k].shape for k in own if k in state):
        notes.append("output layer re-initialised for the number of classes")
    merged = {k: (fixed.get(k, v) if not (in_heads(k) and own[k].shape != v.shape) else own[k]) for k, v in state.items()}
    model.load_state_dict(merged, strict=True)
    return notes


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Conv kernels ``(out, c, *k)`` (``c`` = 3 for RGB) for ``in_channels`` inputs, keeping what they
    compute:

    * fewer channels: every new channel gets the sum of the kernels over the ``c`` channels divided by
      ``in_channels``, so an image repeated over the new channels gives the activations the original
      gave on that image repeated over ``c`` (a grey image, with one channel);
    * more channels: the first ``c`` keep their kernels and the extra ones start at zero, so an image
      whose first ``c`` channels are the original ones (RGB + depth, RGB + NIR) gives the original
      activations.
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight.clone()
    if in_channels < c:
        return (weight.sum(dim=1, keepdim=True) / in_channels).repeat(1, in_channels, *([1] * (weight.dim() - 2)))
    extra = weight.new_zeros(weight.shape[0], in_channels - c, *weight.shape[2:])
    return torch.cat([weight, extra], dim=1)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def resized(layer: nn.Module, *, out_features: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A fresh layer like ``layer`` with another number of outputs or input channels."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, out_features or layer.out_features, bias=layer.bias is not None)
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        cls = type(layer) if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else nn.Conv2d
        inc = in_channels or layer.in_channels
        groups = layer.groups if in_channels is None else 1
        return cls(inc, out_features or layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, groups, layer.bias is not None, layer.padding_mode)
    raise ConfigError(f"cannot resize a {type(layer).__name__} layer (only Linear and Conv output/first layers)")


def find_heads_and_stem(model: nn.Module, in_channels: int, size: int) -> tuple[list[str], str | None]:
    """The layers producing the model's outputs (eval and training mode) and the first conv reading the
    input, found by tracing one forward pass (see :mod:`convsim_shrink.prune.safety`)."""
    x = torch.randn(1, in_channels, size, size)
    heads: list[str] = []
    stem = None
    for train in (False, True):
        try:
            trace = record_trace(model, x, train=train)
        except Exception as exc:
            if train:
                continue
            raise ConfigError(f"the model does not run on a {in_channels}x{size}x{size} input ({first_line(exc, with_type=True)})") from None
        for name in trace.producers(trace.outputs):
            if name not in heads:
                heads.append(name)
        if stem is None:
            stem = next((op.module for i, op in enumerate(trace.ops)
                         if trace.is_compute(i) and any(p is None for p, _ in op.inputs)), None)
    return heads, stem


def apply_adapt(model: nn.Module, adapt: dict[str, Any], *, pretrained: bool) -> list[str]:
    """Replace the output layers (``heads``) for ``num_classes`` and the first conv (``stem``) for
    ``in_channels``; with ``pretrained`` the stem keeps its kernels (:func:`adapt_input_channels`)."""
    notes = []
    modules = dict(model.named_modules())
    for head in adapt.get("heads", []):
        layer = modules[head]
        set_module(model, head, resized(layer, out_features=adapt["num_classes"]))
    if adapt.get("heads"):
        notes.append(f"output layer{'s' if len(adapt['heads']) > 1 else ''} {', '.join(adapt['heads'])} re-initialised for {adapt['num_classes']} classes")
    stem = adapt.get("stem")
    if stem:
        old = modules[stem]
        new = resized(old, in_channels=adapt["in_channels"])
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_input_channels(old.weight.detach(), adapt["in_channels"]))
                if old.bias is not None:
                    new.bias.copy_(old.bias.detach())
            notes.append(f"first conv {stem} adapted to {adapt['in_channels']} input channel(s), kernels kept")
        set_module(model, stem, new)
    if "transform_input" in adapt and hasattr(model, "transform_input"):
        model.transform_input = adapt["transform_input"]
    return notes
