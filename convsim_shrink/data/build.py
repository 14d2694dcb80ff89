"""A run's loaders from its recipe's ``data`` section (:func:`build_data`)."""

from __future__ import annotations

import torch

from ..errors import ConfigError, unknown
from .folders import folder_loaders
from .loaders import DataBundle, TensorLoader, balanced_subset
from .locate import load_arrays
from .presets import INFO


def build_data(cfg, *, batch_size: int, seed: int = 0, eval_batch_size: int | None = None, rank: int = 0,
               world_size: int = 1) -> DataBundle:
    """Loaders for a :class:`~convsim_shrink.recipe.DataConfig`: train, optional validation split, test.

    ``batch_size`` is the global training batch; with ``world_size`` processes each loader is ``rank``'s
    shard (module docstring) and its training batch ``batch_size / world_size``.  ``eval_batch_size``
    is per process.  Raises :class:`ConfigError` when the batch does not divide by the processes or
    ``data.image_size`` is set for a data set whose images have a fixed size.
    """
    if cfg.name not in INFO:
        raise unknown("data set", cfg.name, INFO)
    if batch_size % world_size:
        raise ConfigError(f"the global batch {batch_size} does not divide by the {world_size} processes; choose a multiple of {world_size}")
    local = batch_size // world_size
    if cfg.name == "imagefolder":
        return folder_loaders(cfg, local, seed, eval_batch_size, rank, world_size)
    info = INFO[cfg.name]
    if getattr(cfg, "image_size", None) not in (None, info.image_size):
        raise ConfigError(f"data.image_size applies to image folders; {cfg.name} images are {info.image_size} px, drop data.image_size")
    x, y = load_arrays(cfg.name, cfg.dir, "train", cfg.download)
    xt, yt = load_arrays(cfg.name, cfg.dir, "test", cfg.download)
    val_idx = balanced_subset(y, cfg.val_split, seed + 1) if cfg.val_split else torch.empty(0, dtype=torch.long)
    if cfg.subset:
        train_idx = balanced_subset(y, cfg.subset, seed, exclude=val_idx)
    else:
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().flatten()
    if cfg.test_subset:
        t_idx = balanced_subset(yt, cfg.test_subset, seed)
        xt, yt = xt[t_idx], yt[t_idx]
    eb = eval_batch_size or max(256, local)
    shard = {"rank": rank, "world_size": world_size}
    train = TensorLoader(x[train_idx], y[train_idx], info, batch_size=local, train=True, augment=cfg.augment, seed=seed, **shard)
    val = TensorLoader(x[val_idx], y[val_idx], info, batch_size=eb, train=False, **shard) if cfg.val_split else None
    test = TensorLoader(xt, yt, info, batch_size=eb, train=False, **shard)
    return DataBundle(info, train, val, test)
