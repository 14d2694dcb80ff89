"""Reading the data sets' files: IDX (MNIST, gzip or not) and CIFAR's binary and "python version"
batches.  Nothing here unpickles an untrusted file: IDX and CIFAR binary files are parsed directly, and
the CIFAR pickles are read with an unpickler that only admits the few numpy types they hold."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import DataNotFoundError


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzip or not) as a numpy array."""
    try:
        data = _open_maybe_gz(path)
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if array.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {array.size}")
        return array.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError, gzip.BadGzipFile) as exc:
        raise DataNotFoundError(f"{path} is not a readable IDX file ({exc}); re-download or reinstall the data set") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python-version pickles contain: builtins and numpy arrays/dtypes."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DataNotFoundError(f"{path} is not a readable CIFAR batch ({exc}); re-download the data set") from None


def read_cifar_python(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        d = _read_cifar_pickle(folder / name)
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_binary(folder: Path, files: list[str], label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    record = label_bytes + 3072
    for name in files:
        raw = np.frombuffer((folder / name).read_bytes(), dtype=np.uint8)
        if raw.size % record:
            raise DataNotFoundError(f"{folder / name} is truncated ({raw.size} bytes is not a multiple of {record})")
        rows = raw.reshape(-1, record)
        labels.append(rows[:, label_bytes - 1].astype(np.int64))  # CIFAR-100: coarse then fine label
        images.append(rows[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)
