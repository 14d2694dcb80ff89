"""Atomic file writes: the one way the tool writes a file.

A file is written next to its destination under a hidden temporary name (``.NAME.XXXX.tmp``), flushed to
disk, then moved over the destination with :func:`os.replace`, so a reader (or a resumed run) sees
either the old file or the complete new one, never a torn write.  On any error the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file readable by its owner only (0600); a written file gets the permissions any
# other file the user creates would get (0666 less the umask), read once here, before any thread starts.
_FILE_MODE = 0o666 & ~_umask()


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for a writer that needs a file name (``torch.jit.save``,
    ``torch.onnx.export``, ``savefig``); it replaces ``path`` when the block ends without an error.

    The temporary name does not end in the destination's suffix: pass the format explicitly to writers
    that guess it from the name (``savefig(..., format="png")``).
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (training checkpoints, full-module pickles)."""
    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
