"""The export formats, registered in one place.

Each format is one module of this package holding three functions:

* ``write(job: ExportJob) -> Written``: write ``job.model`` to ``job.path`` (atomically) and check it
  (e.g. the ONNX file against onnxruntime); ``Written.checks`` holds the report fields it measured.
* ``load(path)``: load the file back as something callable on a batch of inputs.
* ``check(opset)``: the preflight, run before any training: the format can be written here.

and one :class:`ExportFormat` line below naming it, the module, the file the pipeline writes and the
packages it needs.  The recipe schema (``export.formats``), the preflight, the export stage and
``convsim-shrink export`` all read :data:`FORMATS`, so a new format is one module, one line here and
one test.  No torch here: the command line reads the names without loading it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data import DataBundle


@dataclass(frozen=True)
class ExportFormat:
    name: str  #: as ``export.formats`` and ``convsim-shrink export --format`` spell it
    module: str  #: the module of this package with ``write``, ``load`` and ``check``
    filename: str  #: what the export stage writes in the run directory
    packages: tuple[str, ...]  #: Python packages (import names) it needs beyond the core dependencies
    summary: str  #: one line for help texts
    needs_data: bool = False  #: writing it reads training images (calibration) and the test set

    @property
    def suffix(self) -> str:
        """The file name's ending after ``model`` (``.onnx``, ``.int8.onnx``): what ``convsim-shrink
        export`` puts next to the source file by default."""
        return self.filename.removeprefix("model")

    def implementation(self) -> ModuleType:
        """The module that writes, loads and checks the format (imported on first use: it loads torch)."""
        return importlib.import_module(f"{__package__}.{self.module}")


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("convsim", "native", "model.safetensors", ("safetensors",),
                     "pickle-free safetensors with the architecture spec (a model outside the registry: a full pickle, model.pt)"),
        ExportFormat("onnx", "onnx", "model.onnx", ("onnx", "onnxruntime"), "ONNX, dynamic batch, checked against onnxruntime"),
        ExportFormat("onnx-int8", "onnx_int8", "model.int8.onnx", ("onnx", "onnxruntime"),
                     "static int8 ONNX (onnxruntime), calibrated on training images, both top-1s measured", needs_data=True),
        ExportFormat("pt2", "pt2", "model.pt2", (), "a torch.export program, dynamic batch, checked against the eager model"),
        ExportFormat("torchscript", "torchscript", "model.ts", (), "a traced TorchScript archive"),
    )
}


@dataclass
class ExportJob:
    """What a format's ``write`` gets: the model (eval mode, on the CPU), where to write it and the
    settings and data some formats need."""

    model: nn.Module
    path: Path
    example_inputs: torch.Tensor  #: one input, (1, C, H, W), on the CPU
    opset: int = 17  #: ONNX opset
    recipe: dict | None = None  #: stored in the native format's header
    metrics: dict | None = None  #: likewise
    data: DataBundle | None = None  #: training images to calibrate on and the test set (needs_data formats)
    int8_calibration: int = 300  #: training images that calibrate the int8 model
    written: dict[str, str] = field(default_factory=dict)  #: files this export already wrote, by format (reused)


@dataclass
class Written:
    """What a format's ``write`` made: the file, the key it is listed under in the run's ``exports``
    (the format's name, or ``pickle``), the report fields it measured and one line for the command line."""

    path: Path
    label: str
    checks: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get_format(name: str) -> ExportFormat:
    """The registered format ``name``; raises :class:`~convsim_shrink.errors.UnknownNameError` listing
    the known ones."""
    from ..errors import unknown

    try:
        return FORMATS[name]
    except KeyError:
        raise unknown("export format", name, FORMATS) from None
