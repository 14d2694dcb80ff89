"""The model sources, registered in one place.

Each source is one module of this package holding

* ``resolve(target, *, num_classes, in_channels, weights, width, small_input) -> Source``: build the
  starting model the user named (``target`` is the spec without its ``prefix``);
* ``rebuild(spec) -> nn.Module``: the architecture a saved rebuild spec describes, fresh weights,
  nothing downloaded (not for checkpoints, whose spec is the model's own);

and one :class:`SourceKind` line below.  :func:`~convsim_shrink.sources.spec.parse_spec` decides which
source a spec names, :func:`~convsim_shrink.sources.resolve_source` and
:func:`~convsim_shrink.sources.rebuild` dispatch through :data:`SOURCES`, so a new source is one
module, one line here and one test.  No torch here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class SourceKind:
    name: str  #: the rebuild spec's ``source`` field, and :attr:`ModelSpec.kind <convsim_shrink.sources.spec.ModelSpec.kind>`
    module: str  #: the module of this package with ``resolve`` and ``rebuild``
    form: str  #: how a spec names it (help texts)
    prefix: str | None = None  #: a spec starting with it names this source

    def implementation(self) -> ModuleType:
        return importlib.import_module(f"{__package__}.{self.module}")


SOURCES: dict[str, SourceKind] = {
    s.name: s
    for s in (
        SourceKind("zoo", "zoo", "resnet18 (convsim-shrink list models)"),
        SourceKind("torchvision", "from_torchvision", "torchvision:NAME", "torchvision:"),
        SourceKind("timm", "from_timm", "timm:NAME", "timm:"),
        SourceKind("import", "from_import", "package.module:function"),
        SourceKind("checkpoint", "from_checkpoint", "PATH.safetensors or a run directory"),
    )
}
