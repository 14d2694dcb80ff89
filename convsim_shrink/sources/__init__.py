"""Where the starting model comes from: the zoo, torchvision, timm, the user's own code, or a checkpoint.

:func:`resolve_source` turns what the user typed into a :class:`Source`: the model, the spec that
rebuilds its architecture without pickle (stored in exported checkpoints; :func:`rebuild` reads it), whether
it arrived with trained weights, and one line describing it.

================================  =========================================================================
``resnet18``                      a zoo model (:func:`convsim_shrink.create_model`)
``torchvision:NAME``              any ``torchvision.models`` classification model; the output layer(s) and the
                                  first conv are replaced when the classes or input channels differ
``timm:NAME``                     a timm model (``pip install 'convsim-shrink[timm]'``); timm adapts both
``package.module:function``       an import string to a function (or class) returning an ``nn.Module``;
                                  ``num_classes``/``in_channels`` (or ``in_chans``) are passed when it takes them
``PATH.safetensors`` or ``RUN/``  a convsim-shrink export, or a run directory (its ``model.safetensors``,
                                  else ``dense.safetensors``): pretrained
================================  =========================================================================

``weights``: ``DEFAULT`` or a torchvision weights name (``IMAGENET1K_V1`` or
``ResNet18_Weights.IMAGENET1K_V1``) downloads torchvision's weights (timm: ``DEFAULT`` downloads timm's);
a file path loads a state dict from a safetensors file, or from a torch file read with
``torch.load(weights_only=True)`` (nothing unpickled).  Pretrained weights keep the first conv's
knowledge when the input channels differ (:func:`adapt_input_channels`: a grey image gives the
activations of its RGB repetition; extra channels start at zero); the output layers are re-initialised
for another number of classes.

The rebuild spec (JSON, in the checkpoint header):

* zoo: ``{"name", "kwargs"}`` (as before);
* torchvision: ``{"source": "torchvision", "name", "kwargs", "weights", "adapt"}`` where ``kwargs``
  are the builder's arguments, ``weights`` the weights' full name (only to restore the builder's
  weight-implied arguments; never downloaded when loading), ``adapt`` ``{"num_classes", "heads",
  "in_channels", "stem", "transform_input"}``;
* timm: ``{"source": "timm", "name", "kwargs"}``;
* import string: ``{"source": "import", "name": "package.module:function", "kwargs"}`` (loading imports
  that module: code you installed, not code from the file).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, ConvSimError, unknown
from ..models import SPEC_ATTR, create_model, list_models

TIMM_INSTALL = "pip install 'convsim-shrink[timm]'"
_IMPORT_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass
class Source:
    """A starting model: ``model``; ``spec``, what rebuilds its architecture (also set as
    ``model.convsim_spec``, so :func:`convsim_shrink.save` can write it); ``pretrained``, whether it
    arrived with trained weights (then pre-minimisation and dense training are skipped by default);
    ``description``, one line for the console and the report; ``header``, the metadata of the
    checkpoint it came from (its ``recipe`` names the data set), or None."""

    model: nn.Module
    spec: dict[str, Any]
    pretrained: bool
    description: str
    header: dict[str, Any] | None = field(default=None)


def resolve_source(spec: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None,
                   width: float = 1.0, small_input: bool = True) -> Source:
    """Build the starting model that ``spec`` names (see the module docstring), for ``num_classes``
    classes and ``in_channels`` input channels (for a checkpoint: None takes the checkpoint's; a
    different number is an error). ``width`` and ``small_input`` shape a zoo model (the recipe's
    ``model.width`` and ``model.small_input``, so that its weights file fits); other sources ignore them.

    Raises :class:`~convsim_shrink.errors.ConfigError` (unknown names, with the closest known one; a bad
    import string; timm missing; weights that cannot be downloaded) or
    :class:`~convsim_shrink.errors.CheckpointError` (an unreadable or unfitting weights file or
    checkpoint), each with one line.
    """
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("no model given: name a zoo model, torchvision:NAME, timm:NAME, package.module:function or a checkpoint path")
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], num_classes, in_channels, weights)
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], num_classes, in_channels, weights)
    path = Path(spec).expanduser()
    if spec.endswith(".safetensors") or path.is_dir() or path.is_file():
        return _checkpoint(path, num_classes, in_channels, weights)
    if ":" in spec:
        if not _IMPORT_RE.match(spec):
            raise ConfigError(f"'{spec}' is neither a model name, torchvision:NAME, timm:NAME, an import string package.module:function nor an existing path")
        return _import_string(spec, num_classes, in_channels, weights)
    if spec not in list_models():
        raise unknown("model", spec, list_models())
    model = create_model(spec, num_classes=_need(num_classes, "num_classes"), in_channels=_need(in_channels, "in_channels"),
                         width=width, small_input=small_input)
    pretrained = False
    description = f"zoo model {spec}, random weights"
    if weights is not None:
        if _is_file_spec(weights):
            _load_state_into(model, read_state_dict(weights), f"zoo model {spec}")
            pretrained, description = True, f"zoo model {spec}, weights from {weights}"
        else:
            raise ConfigError(f"the zoo has no downloadable weights ('{weights}'); pass --weights FILE with a state dict")
    return Source(model, dict(getattr(model, SPEC_ATTR)), pretrained, description)


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The architecture ``spec`` describes, with fresh weights (nothing downloaded, nothing unpickled);
    the model carries ``spec`` as ``model.convsim_spec``.  Pruned layer shapes (``spec["layers"]``) are
    re-applied by :func:`convsim_shrink.export.native.load`, not here.  Raises ConfigError/CheckpointError."""
    source = spec.get("source", "zoo")
    clean = {k: v for k, v in spec.items() if k != "layers"}
    if source == "zoo":
        model = create_model(spec["name"], **spec.get("kwargs", {}))
        return model
    if source == "torchvision":
        import torchvision

        name = spec["name"]
        kwargs = dict(spec.get("kwargs", {}))
        if spec.get("weights"):
            kwargs = {**_weights_kwargs(name, _weights_enum(name, spec["weights"])), **kwargs}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        _apply_adapt(model, spec.get("adapt", {}), pretrained=False)
    elif source == "timm":
        timm = _require_timm(f"timm:{spec['name']}")
        model = timm.create_model(spec["name"], pretrained=False, **spec.get("kwargs", {}))
    elif source == "import":
        model = _call_import(spec["name"], spec.get("kwargs", {}))
    else:
        raise CheckpointError(f"unknown model source '{source}' in the rebuild spec; this version knows zoo, torchvision, timm and import")
    setattr(model, SPEC_ATTR, clean)
    return model


# -------------------------------------------------------------------------------------- helpers


def _need(value: int | None, what: str) -> int:
    if value is None:
        raise ConfigError(f"{what} is needed to build this model; give the data set (or --{what.replace('_', '-')})")
    return value


def _is_file_spec(weights: str) -> bool:
    return Path(weights).expanduser().is_file() or weights.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
            raise CheckpointError(f"{path} is not a readable safetensors file ({_short(exc)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} could not be read with torch.load(weights_only=True) ({_short(exc)}); it holds pickled objects "
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


def _load_state_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, *, heads=(), stem: str | None = None) -> list[str]:
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def _resized(layer: nn.Module, *, out_features: int | None = None, in_channels: int | None = None) -> nn.Module:
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


def _find_heads_and_stem(model: nn.Module, in_channels: int, size: int) -> tuple[list[str], str | None]:
    """The layers producing the model's outputs (eval and training mode) and the first conv reading the
    input, found by tracing one forward pass (see :mod:`convsim_shrink.prune.pruneability`)."""
    from ..prune.pruneability import _record

    x = torch.randn(1, in_channels, size, size)
    heads: list[str] = []
    stem = None
    for train in (False, True):
        try:
            trace = _record(model, x, train=train)
        except Exception as exc:
            if train:
                continue
            raise ConfigError(f"the model does not run on a {in_channels}x{size}x{size} input ({_short(exc)})") from None
        for name in trace.producers(trace.outputs):
            if name not in heads:
                heads.append(name)
        if stem is None:
            stem = next((op.module for i, op in enumerate(trace.ops)
                         if trace.is_compute(i) and any(p is None for p, _ in op.inputs)), None)
    return heads, stem


def _apply_adapt(model: nn.Module, adapt: dict[str, Any], *, pretrained: bool) -> list[str]:
    """Replace the output layers (``heads``) for ``num_classes`` and the first conv (``stem``) for
    ``in_channels``; with ``pretrained`` the stem keeps its kernels (:func:`adapt_input_channels`)."""
    notes = []
    modules = dict(model.named_modules())
    for head in adapt.get("heads", []):
        layer = modules[head]
        _set_module(model, head, _resized(layer, out_features=adapt["num_classes"]))
    if adapt.get("heads"):
        notes.append(f"output layer{'s' if len(adapt['heads']) > 1 else ''} {', '.join(adapt['heads'])} re-initialised for {adapt['num_classes']} classes")
    stem = adapt.get("stem")
    if stem:
        old = modules[stem]
        new = _resized(old, in_channels=adapt["in_channels"])
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_input_channels(old.weight.detach(), adapt["in_channels"]))
                if old.bias is not None:
                    new.bias.copy_(old.bias.detach())
            notes.append(f"first conv {stem} adapted to {adapt['in_channels']} input channel(s), kernels kept")
        _set_module(model, stem, new)
    if "transform_input" in adapt and hasattr(model, "transform_input"):
        model.transform_input = adapt["transform_input"]
    return notes


# ---------------------------------------------------------------------------------- torchvision


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _weights_enum(name: str, weights: str):
    """The torchvision weights enum member ``weights`` names for model ``name`` (``DEFAULT``, a member
    name or the full ``Enum.MEMBER`` name); ConfigError with the known names otherwise."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member = weights.split(".")[-1]
    if weights.count(".") == 1 and weights.split(".")[0] != enum.__name__:
        raise ConfigError(f"weights '{weights}' are not {name}'s; its weights are {enum.__name__}: {', '.join(['DEFAULT', *enum.__members__])}")
    if member == "DEFAULT":
        return enum.DEFAULT
    if member not in enum.__members__:
        raise unknown(f"weights of {name}", member, ["DEFAULT", *enum.__members__])
    return enum[member]


def _weights_kwargs(name: str, weights) -> dict[str, Any]:
    """The constructor arguments torchvision's builder implies when it loads ``weights`` (its
    ``_ovewrite_named_param`` calls), so the same architecture is rebuilt without downloading."""
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if name == "googlenet":
        kwargs.update(transform_input=True, aux_logits=False, init_weights=False)
    elif name == "inception_v3":
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def _torchvision(name: str, num_classes: int | None, in_channels: int | None, weights: str | None) -> Source:
    import torchvision

    names = torchvision_models()
    if name not in names:
        raise unknown("torchvision model", name, names)
    num_classes, in_channels = _need(num_classes, "num_classes"), _need(in_channels, "in_channels")
    file_weights = weights is not None and _is_file_spec(weights)
    enum = _weights_enum(name, weights) if weights is not None and not file_weights else None
    kwargs: dict[str, Any] = {}
    if enum is None:
        kwargs["num_classes"] = num_classes
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"torchvision:{name} cannot be built ({_short(exc)})") from None
        built_classes = num_classes
    else:
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except Exception as exc:
            raise ConfigError(
                f"could not download torchvision's {enum} weights ({_short(exc)}); with no internet, download them "
                f"elsewhere and pass --weights FILE (a state dict)"
            ) from None
        built_classes = len(enum.meta["categories"])
    size = (enum.meta.get("min_size", (224, 224))[0] if enum is not None else 0) or _trace_size(name)
    adapt: dict[str, Any] = {}
    heads, stem = [], None
    if num_classes != built_classes or in_channels != 3 or file_weights:
        heads, stem = _find_heads_and_stem(model, 3, size)
    if num_classes != built_classes:
        adapt.update(num_classes=num_classes, heads=heads)
    if in_channels != 3:
        if stem is None:
            raise ConfigError(f"torchvision:{name}: no conv reads the input, so it cannot take {in_channels} channels")
        adapt.update(in_channels=in_channels, stem=stem)
        if getattr(model, "transform_input", False):
            adapt["transform_input"] = False  # it rescales exactly three ImageNet channels
    notes = _apply_adapt(model, adapt, pretrained=enum is not None)
    pretrained = enum is not None
    description = f"torchvision {name}, " + (f"{enum} weights" if enum is not None else "random weights")
    if file_weights:
        notes += _load_state_into(model, read_state_dict(weights), f"torchvision:{name}", heads=heads, stem=stem)
        pretrained, description = True, f"torchvision {name}, weights from {weights}"
    spec = {"source": "torchvision", "name": name, "kwargs": kwargs, "weights": str(enum) if enum is not None else None, "adapt": adapt}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description + (f" ({'; '.join(notes)})" if notes else ""))


def _trace_size(name: str) -> int:
    """An input size the model accepts for tracing (ViTs and MaxViT need their built-in size)."""
    return 224 if name.startswith(("vit_", "maxvit")) else 96 if name == "inception_v3" else 64


# ----------------------------------------------------------------------------------------- timm


def _require_timm(what: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{what} needs timm, which is not installed: {TIMM_INSTALL}") from None
    return timm


def _timm(name: str, num_classes: int | None, in_channels: int | None, weights: str | None) -> Source:
    timm = _require_timm(f"timm:{name}")
    num_classes, in_channels = _need(num_classes, "num_classes"), _need(in_channels, "in_channels")
    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    kwargs = {"num_classes": num_classes, "in_chans": in_channels}
    file_weights = weights is not None and _is_file_spec(weights)
    if weights is not None and not file_weights and weights != "DEFAULT":
        raise ConfigError(f"timm weights are chosen by the model name (e.g. timm:{name}.TAG); use --weights DEFAULT or --weights FILE")
    pretrained = weights == "DEFAULT"
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except ConvSimError:
        raise
    except Exception as exc:
        if pretrained:
            raise ConfigError(f"could not download timm's weights for {name} ({_short(exc)}); with no internet, pass --weights FILE (a state dict)") from None
        raise ConfigError(f"timm:{name} cannot be built ({_short(exc)})") from None
    description = f"timm {name}, " + ("pretrained weights" if pretrained else "random weights")
    if file_weights:
        heads = [model.default_cfg.get("classifier")] if getattr(model, "default_cfg", {}).get("classifier") else []
        stem = model.default_cfg.get("first_conv") if getattr(model, "default_cfg", None) else None
        notes = _load_state_into(model, read_state_dict(weights), f"timm:{name}", heads=heads, stem=stem)
        pretrained, description = True, f"timm {name}, weights from {weights}" + (f" ({'; '.join(notes)})" if notes else "")
    spec = {"source": "timm", "name": name, "kwargs": kwargs}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description)


# --------------------------------------------------------------------------------- import string


def _resolve_import(target: str):
    module_name, _, attr_path = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ConfigError(
            f"cannot import '{module_name}' for '{target}' (no module named '{missing}'); install the package or run "
            "from the folder that holds it (or add it to PYTHONPATH)"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            choices = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            raise unknown(f"attribute of {module_name}", part, choices)
        obj = getattr(obj, part)
    return obj


def _call_import(target: str, kwargs: dict[str, Any]) -> nn.Module:
    obj = _resolve_import(target)
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj)
    if not callable(obj):
        raise ConfigError(f"'{target}' is a {type(obj).__name__}, not a function or class that returns an nn.Module")
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"'{target}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_string(target: str, num_classes: int | None, in_channels: int | None, weights: str | None) -> Source:
    obj = _resolve_import(target)
    kwargs: dict[str, Any] = {}
    if callable(obj) and not isinstance(obj, nn.Module):
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if num_classes is not None and ("num_classes" in params or takes_any):
            kwargs["num_classes"] = num_classes
        for key in ("in_channels", "in_chans"):
            if in_channels is not None and key in params:
                kwargs[key] = in_channels
                break
    model = _call_import(target, kwargs)
    pretrained = False
    description = f"{target}()" + (f" with {', '.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else "")
    if weights is not None:
        if not _is_file_spec(weights):
            raise ConfigError(f"'{weights}' is not a file: an import-string model takes --weights FILE (a state dict) only")
        _load_state_into(model, read_state_dict(weights), target)
        pretrained, description = True, description + f", weights from {weights}"
    spec = {"source": "import", "name": target, "kwargs": kwargs}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description)


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_file(path: str | Path) -> Path:
    """The model file a checkpoint path means: the file itself, or in a run directory its
    ``model.safetensors`` (the exported, shrunk model), else its ``dense.safetensors``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "dense.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without model.safetensors or dense.safetensors; point at a run directory or a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return path


def is_checkpoint_spec(spec: str) -> bool:
    """Whether ``spec`` names a checkpoint (a ``.safetensors`` path or an existing file or folder) rather
    than a zoo name, ``torchvision:``/``timm:`` model or import string."""
    spec = str(spec).strip()
    if not spec or spec.startswith(("torchvision:", "timm:")):
        return False
    path = Path(spec).expanduser()
    return spec.endswith(".safetensors") or path.is_dir() or path.is_file()


def checkpoint_data(spec: str) -> dict[str, Any] | None:
    """The data set a checkpoint's header records (``{"name", "dir"}``, from the recipe it was made
    with), for a ``spec`` that names a checkpoint; None for other specs or a header without one.
    Raises :class:`~convsim_shrink.errors.CheckpointError` for a missing or unreadable checkpoint."""
    if not is_checkpoint_spec(spec):
        return None
    from ..export.native import read_metadata

    data = (read_metadata(checkpoint_file(spec)).get("recipe") or {}).get("data") or {}
    return {"name": data["name"], "dir": data.get("dir")} if data.get("name") else None


def checkpoint_recipe(spec: str) -> dict[str, Any] | None:
    """The recipe a checkpoint's header records (the resolved recipe of the run that made it), as the
    base recipe for shrinking that checkpoint again: its data set, pruning, fine-tuning and export settings
    carry over; ``run.out`` is dropped (a new run gets a new folder) and ``run.recipe_source`` names the
    checkpoint.  None for specs that are not checkpoints, or a header without a recipe (a file saved by
    :func:`convsim_shrink.save` outside a run).
    Raises :class:`~convsim_shrink.errors.CheckpointError` for a missing or unreadable checkpoint."""
    if not is_checkpoint_spec(spec):
        return None
    from ..export.native import read_metadata

    file = checkpoint_file(spec)
    recipe = read_metadata(file).get("recipe")
    if not isinstance(recipe, dict) or not recipe:
        return None
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    run = recipe.setdefault("run", {})
    run.pop("out", None)
    run["recipe_source"] = f"the recipe recorded in {file}"
    return recipe


def _checkpoint(path: Path, num_classes: int | None, in_channels: int | None, weights: str | None) -> Source:
    from ..export.native import load, read_metadata

    if weights is not None:
        raise ConfigError(f"{path} already holds its weights; drop --weights")
    file = checkpoint_file(path)
    header = read_metadata(file)
    model = load(file)
    spec = header["spec"]
    have_classes, have_channels = _spec_io(spec)
    if num_classes is not None and have_classes is not None and num_classes != have_classes:
        raise ConfigError(f"{file} predicts {have_classes} classes but the data has {num_classes}; use the data set it was trained on")
    if in_channels is not None and have_channels is not None and in_channels != have_channels:
        raise ConfigError(f"{file} takes {have_channels} input channel(s) but the data has {in_channels}; use the data set it was trained on")
    data = (header.get("recipe") or {}).get("data", {}).get("name")
    description = f"checkpoint {file}" + (f" (trained on {data})" if data else "")
    return Source(model, spec, True, description, header)


def _spec_io(spec: dict[str, Any]) -> tuple[int | None, int | None]:
    """(classes, input channels) a rebuild spec records, where it does."""
    kwargs = spec.get("kwargs", {})
    adapt = spec.get("adapt", {})
    classes = adapt.get("num_classes", kwargs.get("num_classes"))
    channels = adapt.get("in_channels", kwargs.get("in_channels", kwargs.get("in_chans")))
    if spec.get("source") == "torchvision" and channels is None:
        channels = 3
    return classes, channels


__all__ = ["Source", "adapt_input_channels", "checkpoint_data", "checkpoint_file", "checkpoint_recipe", "is_checkpoint_spec", "read_state_dict", "rebuild", "resolve_source", "torchvision_models", "TIMM_INSTALL"]
