"""Compatibility only: the names that lived here before the training code was split by concern.

New code imports from :mod:`convsim_shrink.train` (the loop, optimizers, losses, calibration, device,
distributed helpers) and :mod:`convsim_shrink.io` (atomic writes).  Nothing inside the package imports
this module; it can go once no caller outside does.
"""

from .io import atomic_torch_save, atomic_write_bytes
from .train import *  # noqa: F403
from .train import __all__ as _train_all

__all__ = [*_train_all, "atomic_torch_save", "atomic_write_bytes"]
