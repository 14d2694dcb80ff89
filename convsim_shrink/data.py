"""Data sets by name, their presets, and loaders fast on a 2-core CPU.

``fashion-mnist`` (the embedded default), ``cifar10`` and ``cifar100`` are read into memory as uint8
tensors and augmented a batch at a time (random crop with zero padding, horizontal flip), which keeps
two CPU cores busy with the model instead of with per-image PIL work.  ``imagefolder`` (``train/`` and
``val/`` folders of class sub-folders) goes through torchvision's ``ImageFolder`` and a ``DataLoader``
with workers.

Nothing here unpickles an untrusted file: IDX and CIFAR binary files are parsed directly, and the CIFAR
"python version" pickles are read with an unpickler that only admits the few numpy types they hold.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataNotFoundError, unknown

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("CONVSIM_DATA", Path.home() / ".cache" / "convsim-shrink"))


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding of the training preset
    flip: bool = True
    classes: tuple[str, ...] = field(default=(), compare=False)


INFO = {
    "fashion-mnist": DataInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), pad=2),
    "cifar10": DataInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), pad=4),
    "cifar100": DataInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4),
    "imagefolder": DataInfo("imagefolder", 0, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), pad=0),
}


def list_datasets() -> list[str]:
    return sorted(INFO)


# ------------------------------------------------------------------------------------ file formats


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


def _cifar_from_python(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        d = _read_cifar_pickle(folder / name)
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _cifar_from_binary(folder: Path, files: list[str], label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------- locating


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataNotFoundError(
            f"downloading {name} into {CACHE_DIR} failed ({first}); check the network connection, "
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
                return _cifar_from_binary(base, bin_files, 1 if ten else 2)
            if all((base / f).is_file() for f in py_files):
                return _cifar_from_python(base, py_files, b"labels" if ten else b"fine_labels")
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


# ---------------------------------------------------------------------------------------- subsets


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic, class-balanced choice of ``n`` indices (classes differ in size by at most one)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    if exclude is not None and len(exclude):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[exclude] = False
        order = order[keep[order]]
    classes = torch.unique(labels)
    per_class = [order[labels[order] == c] for c in classes]
    chosen = []
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    for idx, q in zip(per_class, quota):
        chosen.append(idx[:q])
    out = torch.cat(chosen)
    if len(out) < n:
        raise ConfigError(f"asked for {n} images but only {len(out)} are available; lower data.subset / data.val_split")
    return out.sort().values


# ------------------------------------------------------------------------------------------ loaders


class TensorLoader:
    """Batches from in-memory uint8 images, augmented and normalised a batch at a time.

    Iteration order depends only on ``seed`` and the epoch (``set_epoch``), so a resumed run sees the
    same batches.  ``rank``/``world_size`` shard the data for DistributedDataParallel.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DataInfo,
        *,
        batch_size: int,
        train: bool,
        augment: bool = True,
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.labels, self.info = images, labels, info
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.seed, self.epoch = seed, 0
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "TensorLoader":
        """Keep the data on ``device`` (GPU: augmentation runs there too)."""
        self.device = torch.device(device)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        return idx[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.labels), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.info.pad
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        if self.info.flip:
            flip = (torch.rand(b, generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return x

    def __iter__(self):
        idx = self._indices().to(self.device)
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        stop = len(idx) - (len(idx) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            sel = idx[start : start + self.batch_size]
            x = self.images[sel]
            if self.augment:
                x = self._augment(x, g)
            x = (x.float().div_(255) - self.mean) / self.std
            yield x, self.labels[sel]


@dataclass
class DataBundle:
    info: DataInfo
    train: object
    val: object | None
    test: object


def _folder_loaders(cfg, batch_size: int, seed: int):
    import torchvision
    from torchvision import transforms as T

    root = Path(cfg.dir) if cfg.dir else None
    if root is None or not (root / "train").is_dir():
        raise DataNotFoundError(
            f"imagefolder needs --data-dir pointing at a folder with train/ and val/ sub-folders of class folders "
            f"(got {root})"
        )
    info = INFO["imagefolder"]
    size = 224
    normalize = T.Normalize(info.mean, info.std)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]) if cfg.augment else T.Compose([T.Resize(256), T.CenterCrop(size), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(size), T.ToTensor(), normalize])
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not val_dir.is_dir():
        raise DataNotFoundError(f"imagefolder: {root} has train/ but no val/ (or test/) folder")
    try:
        train_set = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
        test_set = torchvision.datasets.ImageFolder(str(val_dir), eval_tf)
    except OSError as exc:  # e.g. a class folder without a single image
        first = str(exc).strip().splitlines()[0]
        raise DataNotFoundError(f"imagefolder: {first}; every class folder needs at least one image") from None
    info = DataInfo("imagefolder", len(train_set.classes), 3, size, info.mean, info.std, pad=0, classes=tuple(train_set.classes))
    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    pin = torch.cuda.is_available()
    g = torch.Generator().manual_seed(seed)
    mk = lambda ds, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, drop_last=shuffle, generator=g,
    )
    if cfg.subset:
        targets = torch.tensor(train_set.targets)
        train_set = torch.utils.data.Subset(train_set, balanced_subset(targets, cfg.subset, seed).tolist())
    return DataBundle(info, mk(train_set, True), None, mk(test_set, False))


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


def build_data(cfg, *, batch_size: int, seed: int = 0, eval_batch_size: int | None = None) -> DataBundle:
    """Loaders for a :class:`~convsim_shrink.recipe.DataConfig`: train, optional validation split, test."""
    if cfg.name not in INFO:
        raise unknown("data set", cfg.name, INFO)
    if cfg.name == "imagefolder":
        return _folder_loaders(cfg, batch_size, seed)
    info = INFO[cfg.name]
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
    eb = eval_batch_size or max(256, batch_size)
    train = TensorLoader(x[train_idx], y[train_idx], info, batch_size=batch_size, train=True, augment=cfg.augment, seed=seed)
    val = TensorLoader(x[val_idx], y[val_idx], info, batch_size=eb, train=False) if cfg.val_split else None
    test = TensorLoader(xt, yt, info, batch_size=eb, train=False)
    return DataBundle(info, train, val, test)


def sample_batch(loader, n: int) -> torch.Tensor:
    """The first ``n`` normalised images a loader yields (evaluation order), for measurements."""
    out, have = [], 0
    for x, _ in loader:
        out.append(x)
        have += len(x)
        if have >= n:
            break
    return torch.cat(out)[:n]


__all__ = ["INFO", "DataInfo", "DataBundle", "TensorLoader", "build_data", "load_arrays", "list_datasets", "balanced_subset", "read_idx", "sample_batch"]
