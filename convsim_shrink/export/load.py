"""Loading any exported model back: the file's content, not its name, says which format it is."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from . import native, pt2, torchscript


def load(path: str | Path, *, map_location: str | torch.device = "cpu", trust_pickle: bool = False) -> nn.Module:
    """Load an exported model.

    * ``.safetensors`` (the native format): rebuilt from its spec, weights loaded; nothing unpickled
      (:func:`~convsim_shrink.export.native.load`).
    * ``torch.export`` programs (``pt2``): the program's module, which runs as exported (eval mode).
    * TorchScript archives: ``torch.jit.load``.
    * a full ``torch.save`` pickle of a module: only with ``trust_pickle=True`` (it can run code).

    Raises :class:`~convsim_shrink.errors.CheckpointError` for a missing, unreadable or untrusted file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        return native.load(path, map_location=map_location)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("/archive_format") for n in names):  # a torch.export program (pt2)
        return pt2.load(path)  # runs as exported (eval); torch 2.14 refuses .eval() on it
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):  # a TorchScript archive
        return torchscript.load(path, map_location=map_location)
    return native.load_pickle(path, map_location=map_location, trust_pickle=trust_pickle)
