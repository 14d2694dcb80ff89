"""Model source ``package.module:function``: an import string to a function (or class) returning an
``nn.Module`` (loading it imports that module: code you installed, not code from a file)."""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown
from ..models import SPEC_ATTR
from .adapting import is_file_spec, load_state_into, read_state_dict
from .base import Source


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


def resolve(target: str, *, num_classes: int | None, in_channels: int | None, weights: str | None = None, **_) -> Source:
    """``package.module:function``: the function (or class) called with ``num_classes`` and
    ``in_channels``/``in_chans`` where it takes them; ``weights``: a state dict file only."""
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
        if not is_file_spec(weights):
            raise ConfigError(f"'{weights}' is not a file: an import-string model takes --weights FILE (a state dict) only")
        load_state_into(model, read_state_dict(weights), target)
        pretrained, description = True, description + f", weights from {weights}"
    spec = {"source": "import", "name": target, "kwargs": kwargs}
    setattr(model, SPEC_ATTR, spec)
    return Source(model, copy.deepcopy(spec), pretrained, description)


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The module the spec's import string builds, called with the recorded arguments."""
    return _call_import(spec["name"], spec.get("kwargs", {}))
