"""What kind of model a spec names: the one place that decides it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, unknown
from ..models import list_models
from .registry import SOURCES

_IMPORT_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``kind`` (a key of :data:`~convsim_shrink.sources.registry.SOURCES`) and
    ``target``, what that source takes (the zoo name, the torchvision or timm name, the import string,
    the checkpoint path)."""

    kind: str
    target: str


def parse_spec(text: str) -> ModelSpec:
    """Which source ``text`` names, in this order: ``torchvision:NAME`` and ``timm:NAME``; a checkpoint
    (a path ending in ``.safetensors``, or an existing file or folder); an import string
    ``package.module:function``; a zoo model name.

    Raises :class:`~convsim_shrink.errors.ConfigError` for an empty spec or one with a ``:`` that is no
    import string, :class:`~convsim_shrink.errors.UnknownNameError` for an unknown zoo name (with the
    closest known one): both before anything is built or read.
    """
    spec = str(text).strip()
    if not spec:
        raise ConfigError("no model given: name a zoo model, torchvision:NAME, timm:NAME, package.module:function or a checkpoint path")
    for kind in SOURCES.values():
        if kind.prefix and spec.startswith(kind.prefix):
            return ModelSpec(kind.name, spec[len(kind.prefix):])
    path = Path(spec).expanduser()
    if spec.endswith(".safetensors") or path.is_dir() or path.is_file():
        return ModelSpec("checkpoint", spec)
    if ":" in spec:
        if not _IMPORT_RE.match(spec):
            raise ConfigError(f"'{spec}' is neither a model name, torchvision:NAME, timm:NAME, an import string package.module:function nor an existing path")
        return ModelSpec("import", spec)
    if spec not in list_models():
        raise unknown("model", spec, list_models())
    return ModelSpec("zoo", spec)
