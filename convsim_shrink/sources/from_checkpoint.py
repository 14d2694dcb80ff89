"""Model source: a convsim-shrink export (``PATH.safetensors``) or a run directory (its
``model.safetensors``, else ``dense.safetensors``), pretrained; and the recipe its header records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..export.native import load, read_metadata
from .base import Source
from .spec import parse_spec


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


def checkpoint_recipe(spec: str) -> dict[str, Any] | None:
    """The recipe a checkpoint's header records (the resolved recipe of the run that made it), as the
    base recipe for shrinking that checkpoint again: its data set, pruning, fine-tuning and export settings
    carry over; ``run.out`` is dropped (a new run gets a new folder) and ``run.recipe_source`` names the
    checkpoint.  None for specs that are not checkpoints, or a header without a recipe (a file saved by
    :func:`convsim_shrink.save` outside a run).
    Raises :class:`~convsim_shrink.errors.CheckpointError` for a missing or unreadable checkpoint."""
    if parse_spec(spec).kind != "checkpoint":
        return None
    file = checkpoint_file(spec)
    recipe = read_metadata(file).get("recipe")
    if not isinstance(recipe, dict) or not recipe:
        return None
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    run = recipe.setdefault("run", {})
    run.pop("out", None)
    run["recipe_source"] = f"the recipe recorded in {file}"
    return recipe


def resolve(path: str | Path, *, num_classes: int | None, in_channels: int | None, weights: str | None = None, **_) -> Source:
    """The model a checkpoint (or a run directory: :func:`checkpoint_file`) holds, pretrained; None for
    ``num_classes``/``in_channels`` takes the checkpoint's, another number than it records is an error."""
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
