"""Preflight: what a run needs from the machine and the user, checked before any work is done.

A long run must never die at its end for something knowable at its start.  :func:`check_run` is the
first thing :meth:`~convsim_shrink.pipeline.runner.Runner.prepare` does, before the data is read, the run
directory is created or a single step is trained.  Each check raises a subclass of
:class:`~convsim_shrink.errors.ConvSimError` whose message is one line naming the problem and the fix
(the command line prints it and exits with status 2), and none of them leaves anything behind.

=============  ======================================================================================
check          what it proves
=============  ======================================================================================
device         the device asked for (``run.device``) is there
precision      the training and fine-tuning precisions run on that device
exports        every format in ``export.formats`` has its packages (ONNX: onnx, and onnxruntime for
               the check of the exported file), the opset is one this torch writes, and a tiny model
               exports and runs through onnxruntime in memory
report         the packages the report needs (matplotlib) import
output         the run directory can be created and written (no file in the way, not a non-empty
               folder unless resuming, the filesystem takes a new entry)
=============  ======================================================================================

The data is checked right after these, still before anything is written: ``prepare`` reads it
(:func:`~convsim_shrink.data.build_data`), and reading is the only check that proves it is usable.
Then :func:`check_model` proves that a model the user brought (a module given to the Python API, an
import string, a checkpoint, torchvision or timm) is one the tool can hook, trace and train: an eager
module (not TorchScript), with parameters, that runs on one input of the data's shape.  Models the
tool cannot lay out in channels_last (Conv3d) are not refused: only their 2-d kernels are converted
(:func:`~convsim_shrink.train.set_memory_format`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path

from ..errors import (
    ConfigError,
    MissingDependencyError,
    OutputNotWritableError,
    first_line,
)

REPORT_PACKAGES = ("matplotlib",)


def check_run(recipe, run_dir: str | Path | None, *, resume: bool = False) -> None:
    """Every check of this module for one run of ``recipe`` (a resolved
    :class:`~convsim_shrink.recipe.Recipe`) writing to ``run_dir`` (``None``: nothing is written, so
    the export, report and output checks are skipped).

    Raises :class:`~convsim_shrink.errors.ConfigError` (device, precision, opset, run directory in
    use), :class:`~convsim_shrink.errors.MissingDependencyError` (a package) or
    :class:`~convsim_shrink.errors.OutputNotWritableError` (the run directory).
    """
    device = check_device(recipe.run.device)
    check_precision(device, recipe)
    if run_dir is None:
        return
    check_exports(recipe.export.formats, opset=recipe.export.opset)
    require_packages(REPORT_PACKAGES, "the run report (plots)")
    check_output_dir(Path(run_dir), resume=resume)


# ------------------------------------------------------------------------------------- device


def check_device(name: str):
    """The ``torch.device`` for ``run.device``; raises :class:`ConfigError` when it is not available."""
    from ..train import resolve_device

    return resolve_device(name)


def check_precision(device, recipe) -> None:
    """Both training stages' precision settings work on ``device`` (fp16 autocast does not on a CPU)."""
    from ..train import resolve_precision

    for section in ("train", "finetune"):
        cfg = getattr(recipe, section)
        try:
            resolve_precision(device, cfg.precision, cfg.channels_last)
        except ConfigError as exc:
            raise ConfigError(f"{section}.precision={cfg.precision}: {exc}") from None


# ------------------------------------------------------------------------------------ packages


def require_packages(packages: tuple[str, ...] | list[str], needed_for: str, *, instead: str = "") -> None:
    """Import each package; raises :class:`MissingDependencyError` naming the ``pip install`` that fixes
    it.  A package that is installed but fails to import (a broken build, a missing shared library)
    counts as missing: it would fail the same way at the end of the run."""
    missing, broken = [], []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            (missing if getattr(exc, "name", None) == name else broken).append((name, exc))
        except OSError as exc:  # e.g. a shared library of the package cannot be loaded
            broken.append((name, exc))
    if not missing and not broken:
        return
    alternative = f", or {instead}" if instead else ""
    if missing:
        names = [n for n, _ in missing]
        are, them = ("is", "it") if len(names) == 1 else ("are", "them")
        raise MissingDependencyError(
            f"{needed_for} needs {' and '.join(names)}, which {are} not installed; install {them} with "
            f"`pip install {' '.join(names)}`{alternative}"
        )
    name, exc = broken[0]
    raise MissingDependencyError(
        f"{needed_for} needs {name}, which is installed but does not import ({first_line(exc, 10_000)}); "
        f"reinstall it with `pip install --force-reinstall {name}`{alternative}"
    )


def check_exports(formats, *, opset: int = 17) -> None:
    """Every export format in ``formats`` can be written here: it is registered
    (:mod:`convsim_shrink.export.registry`), its packages import, and its own ``check`` passes (ONNX: the
    opset is one this torch writes and a tiny model exports and runs through onnxruntime, in memory;
    onnx-int8: a one-conv model quantizes and runs)."""
    from ..export.registry import get_format

    formats = list(formats)
    chosen = [get_format(fmt) for fmt in formats]  # an unknown name lists the known ones
    for fmt in chosen:
        others = [f for f in formats if f != fmt.name]
        instead = f"drop it: --set 'export.formats=[{', '.join(others)}]'" if others else ""
        require_packages(fmt.packages, f"export format '{fmt.name}'", instead=instead)
    for fmt in chosen:
        fmt.implementation().check(opset)


# --------------------------------------------------------------------------------------- model


def check_model(model, example_inputs) -> None:
    """``model`` is an eager ``nn.Module`` the tool can hook and trace (torch-pruning records its forward
    pass, measuring registers forward hooks: TorchScript supports neither), it has parameters to train
    and prune, and it runs on ``example_inputs`` (one input of the data's shape; in evaluation mode,
    without gradients, on a float copy of a half-precision model).  Raises :class:`ConfigError`."""
    import copy

    import torch
    from torch import nn

    from ..models import evaluating

    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model is a {type(model).__name__}, not a torch.nn.Module; pass the module itself")
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        what = "the model is" if scripted[0] == "" else f"the model's layer '{scripted[0]}' is"
        raise ConfigError(
            f"{what} TorchScript (torch.jit.script or torch.jit.trace), which cannot be hooked or traced for pruning; "
            "pass the nn.Module as it was before scripting (export.formats can write TorchScript of the shrunk model)"
        )
    params = list(model.parameters())
    if not params:
        raise ConfigError("the model has no parameters, so there is nothing to train or prune; give a model with conv or linear layers")
    work = model
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
        work = copy.deepcopy(model).float()  # trained in float32 (adapt.to_float32); the caller's stays as it is
    x = example_inputs.to(params[0].device)
    try:
        with evaluating(work), torch.no_grad():
            work(x)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, every stage would raise it too
        shape = "x".join(str(s) for s in x.shape)
        raise ConfigError(
            f"the model does not run on the data's inputs of shape {shape} ({first_line(exc, 200, with_type=True)}); "
            "give a model for inputs of this shape, or data of the shape it takes"
        ) from None


# -------------------------------------------------------------------------------------- output


def check_output_dir(run_dir: Path, *, resume: bool = False) -> None:
    """The run directory can be made and written, without leaving anything behind.

    A new run needs ``run_dir`` absent or an empty folder; a resumed one needs it to exist.  The
    nearest existing folder on the way takes a trial entry (made and removed at once), which is what
    proves that the filesystem is writable (permissions, read-only mounts, ACLs).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputNotWritableError(f"{run_dir} is a file, not a folder; choose another --out")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already exists and is not empty; choose another --out or --resume it")
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritableError(f"cannot create {run_dir}: {existing} is a file, not a folder; choose another --out")
    try:
        trial = tempfile.mkdtemp(prefix=".convsim-shrink-preflight-", dir=existing)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputNotWritableError(f"cannot write {run_dir}: {existing} is not writable ({reason}); choose another --out") from None
    with contextlib.suppress(OSError):
        os.rmdir(trial)


__all__ = [
    "check_device",
    "check_exports",
    "check_model",
    "check_output_dir",
    "check_precision",
    "check_run",
    "require_packages",
]
