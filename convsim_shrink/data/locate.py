"""Finding an in-memory data set's files (``--data-dir``, the Debian package, the cache folder) or
downloading them into the cache (torchvision), and reading them (:func:`load_arrays`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataNotFoundError, first_line, unknown
from .formats import read_cifar_binary, read_cifar_python, read_idx
from .presets import INFO

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("CONVSIM_DATA", Path.home() / ".cache" / "convsim-shrink"))


def _candidate_dirs(name: str, root: Path | None) -> list[Path]:
    dirs = []
    if root is not None:
        dirs += [root, root / name]
    if name == "fashion-mnist":
        if root is not None:
            dirs += [root / "FashionMNIST" / "raw"]
        dirs += [DEBIAN_FASHION_MNIST, CACHE_DIR / "FashionMNIST" / "raw"]
    else:
        dirs += [CACHE_DIR]
    return dirs


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _missing(name: str, looked: list[Path], how: str) -> DataNotFoundError:
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    return DataNotFoundError(f"{name} not found (looked in {where}); {how}")


def _download(fetch, name: str) -> None:
    """Run a torchvision download; a network or disk failure becomes one line naming the fix."""
    try:
        fetch()
    except (OSError, RuntimeError) as exc:
        raise DataNotFoundError(
            f"downloading {name} into {CACHE_DIR} failed ({first_line(exc, 10_000)}); check the network connection, "
            "or put the files in a folder and pass it with --data-dir"
        ) from None


def _load_fashion_mnist(root: Path | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    looked = _candidate_dirs("fashion-mnist", root)
    for folder in looked:
        img, lab = (_find_file(folder, s) for s in _FMNIST_FILES[split])
        if img and lab:
            x, y = read_idx(img), read_idx(lab)
            return x[:, None], y.astype(np.int64)
    if download:
        import torchvision

        _download(lambda: torchvision.datasets.FashionMNIST(str(CACHE_DIR), train=split == "train", download=True), "fashion-mnist")
        return _load_fashion_mnist(CACHE_DIR / "FashionMNIST" / "raw", split, download=False)
    raise _missing(
        "fashion-mnist",
        looked,
        "install it with `apt-get install dataset-fashion-mnist`, point --data-dir at the IDX files, "
        "or allow downloading with --set data.download=true",
    )


def _load_cifar(name: str, root: Path | None, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    ten = name == "cifar10"
    py_folder, bin_folder = ("cifar-10-batches-py", "cifar-10-batches-bin") if ten else ("cifar-100-python", "cifar-100-binary")
    looked = _candidate_dirs(name, root)
    for folder in looked:
        for base in (folder, folder / py_folder, folder / bin_folder):
            if ten:
                py_files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
                bin_files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
            else:
                py_files = ["train"] if split == "train" else ["test"]
                bin_files = ["train.bin"] if split == "train" else ["test.bin"]
            if all((base / f).is_file() for f in bin_files):
                return read_cifar_binary(base, bin_files, 1 if ten else 2)
            if all((base / f).is_file() for f in py_files):
                return read_cifar_python(base, py_files, b"labels" if ten else b"fine_labels")
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if ten else torchvision.datasets.CIFAR100
        _download(lambda: cls(str(CACHE_DIR), train=split == "train", download=True), name)
        return _load_cifar(name, CACHE_DIR, split, download=False)
    raise _missing(
        name,
        looked,
        f"point --data-dir at a folder holding {py_folder}/ or {bin_folder}/, or allow downloading with "
        "--set data.download=true",
    )


def load_arrays(name: str, root: str | Path | None = None, split: str = "train", download: bool = False):
    """``(images uint8 (N, C, H, W), labels int64 (N,))`` of an in-memory data set."""
    root = Path(root).expanduser() if root else None
    if name == "fashion-mnist":
        x, y = _load_fashion_mnist(root, split, download)
    elif name in ("cifar10", "cifar100"):
        x, y = _load_cifar(name, root, split, download)
    else:
        raise unknown("data set", name, [n for n in INFO if n != "imagefolder"])
    return torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(np.array(y, dtype=np.int64, copy=True))
