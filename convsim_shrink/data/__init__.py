"""Data sets by name, their presets, and loaders fast on a 2-core CPU.

``fashion-mnist`` (the embedded default), ``cifar10`` and ``cifar100`` are read into memory as uint8
tensors and augmented a batch at a time (random crop with zero padding, horizontal flip), which keeps
two CPU cores busy with the model instead of with per-image PIL work.  ``imagefolder`` (``train/`` and
``val/`` folders of class sub-folders) is scanned before training (:func:`scan_image_folder`) and read
by a ``DataLoader`` with workers in an order that depends only on the seed and the epoch.

Several processes (``torchrun``): every loader takes ``rank``/``world_size``.  Training loaders draw
their order from :class:`torch.utils.data.DistributedSampler` (one permutation per epoch, seeded by the
seed and the epoch, the same on every rank, padded to a multiple of the processes and dealt out
round-robin), so every rank runs the same number of steps and the ranks' batches ``j`` together are
exactly the single-process batch ``j`` of the global batch.  Evaluation loaders deal the images out
round-robin without padding, so that every image is counted exactly once when the sums are
all-reduced.  :meth:`DataBundle.unsharded` gives rank 0 the whole data back (exports, int8 calibration).

A training loader never trains zero steps: it drops the last partial batch only when there is at least
one full batch besides it.

Nothing here unpickles an untrusted file: IDX and CIFAR binary files are parsed directly, and the CIFAR
"python version" pickles are read with an unpickler that only admits the few numpy types they hold.
"""

from __future__ import annotations

import copy
import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataNotFoundError, first_line, unknown

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


def _drops(drop_last: bool, n: int, batch_size: int) -> bool:
    """Drop the last partial batch only when a full batch is left besides it: a training set smaller
    than one batch trains on that one partial batch instead of silently training zero steps."""
    return drop_last and n >= batch_size


def _train_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the epoch's training order: ``DistributedSampler``'s permutation of
    ``range(n)`` seeded by ``seed * 100_003 + epoch`` (with one process: that permutation itself)."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed * 100_003, drop_last=False
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _shard_len(n: int, train: bool, rank: int, world_size: int) -> int:
    """Images one rank sees per epoch: training pads to a multiple of the processes, evaluation does not."""
    return -(-n // world_size) if train else len(range(rank, n, world_size))


def _check_shard(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")


class TensorLoader:
    """Batches from in-memory uint8 images, augmented and normalised a batch at a time.

    Iteration order depends only on ``seed`` and the epoch (``set_epoch``), so a resumed run sees the
    same batches.  ``rank``/``world_size`` shard the data for DistributedDataParallel (module
    docstring); ``batch_size`` is then this process's share of the global batch.  Augmentations are
    drawn for the whole global batch and each rank takes its images' draws, so the ranks together see
    exactly what one process with the global batch sees.
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
        _check_shard(rank, world_size)
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

    def sharded(self, rank: int, world_size: int) -> "TensorLoader":
        """A copy for ``rank`` of ``world_size`` (sharing the images), its batch this rank's share of
        the same global batch."""
        out = copy.copy(self)
        out.batch_size = self.batch_size * self.world_size // world_size if self.train else self.batch_size
        _check_shard(rank, world_size)
        out.rank, out.world_size = rank, world_size
        return out

    def rebatched(self, global_batch: int) -> "TensorLoader":
        """This loader with another global batch (a copy sharing the images; ``self`` if it is the same).
        The order of the images does not depend on the batch size, so only how they are grouped changes."""
        if not self.train or global_batch == self.batch_size * self.world_size:
            return self
        if global_batch % self.world_size:
            raise ValueError(f"a global batch of {global_batch} does not divide by {self.world_size} processes")
        out = copy.copy(self)
        out.batch_size = global_batch // self.world_size
        return out

    def unaugmented(self) -> "TensorLoader":
        """The same images without augmentation, in a fixed order (a new loader in evaluation mode, on the
        CPU, at this batch size), for calibration; ``self`` when this loader does not augment."""
        if not self.augment:
            return self
        return TensorLoader(self.images.cpu(), self.labels.cpu(), self.info, batch_size=self.batch_size, train=False)

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.train:
            return torch.tensor(_train_order(n, self.seed, self.epoch, self.rank, self.world_size), dtype=torch.long)
        return torch.arange(n)[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = _shard_len(len(self.labels), self.train, self.rank, self.world_size)
        return n // self.batch_size if _drops(self.drop_last, n, self.batch_size) else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.info.pad
        mine = slice(self.rank, None, self.world_size)  # this rank's images of the global batch

        def draw(fn):  # one draw per image of the global batch; this rank keeps its own
            return fn(b * self.world_size)[mine][:b].to(x.device)

        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = draw(lambda k: torch.randint(0, 2 * p + 1, (k,), generator=g))
            ox = draw(lambda k: torch.randint(0, 2 * p + 1, (k,), generator=g))
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        if self.info.flip:
            flip = draw(lambda k: torch.rand(k, generator=g) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return x

    def __iter__(self):
        idx = self._indices().to(self.device)
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        stop = len(idx) - (len(idx) % self.batch_size if _drops(self.drop_last, len(idx), self.batch_size) else 0)
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
    #: what was skipped while reading the data (one line each; for the console and the report)
    notes: list[str] = field(default_factory=list)
    scan: "FolderScan | None" = None

    def unsharded(self) -> "DataBundle":
        """The same data as one process sees it (rank 0 of 1, the whole global batch): for work that
        rank 0 does alone, such as int8 calibration and the int8 model's top-1 on the whole test set.
        Loaders that cannot be re-sharded (a user's own) are kept as they are."""

        def whole(loader):
            if getattr(loader, "world_size", 1) > 1 and hasattr(loader, "sharded"):
                return loader.sharded(0, 1)
            return loader

        return DataBundle(self.info, whole(self.train), whole(self.val), whole(self.test), self.notes, self.scan)


# ---------------------------------------------------------------------------------- image folders

#: file endings read as images (as torchvision's ImageFolder)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _stray(name: str) -> bool:
    """Folders that are not classes: hidden ones (``.ipynb_checkpoints``, ``.DS_Store``) and ``__MACOSX``-like."""
    return name.startswith((".", "__"))


def verify_image(path: str | Path) -> str | None:
    """Why the image at ``path`` cannot be read, or None.  Decodes it (JPEGs at a reduced scale, which
    still reads every byte), so truncated and corrupt files are found, not only bad headers."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return first_line(exc, 120)
    return None


@dataclass
class FolderScan:
    """What :func:`scan_image_folder` found: the classes (from ``train/``), the readable samples
    ``(path, class index)`` of each split, and everything it skipped."""

    root: Path
    val_dir: Path
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    stray_folders: list[str] = field(default_factory=list)  # hidden / __MACOSX-like folders, skipped
    empty_classes: list[str] = field(default_factory=list)  # train/ class folders without readable images, skipped
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why), skipped
    other_files: int = 0  # files that are not images, skipped
    absent_from_val: list[str] = field(default_factory=list)  # classes of train/ with no image in val/ (top-1 does not see them)

    def notes(self) -> list[str]:
        """One line per kind of thing skipped (empty when nothing was)."""
        out = []
        if self.stray_folders:
            out.append(f"imagefolder: skipped {len(self.stray_folders)} folder(s) that are not classes: {_few(self.stray_folders)}")
        if self.empty_classes:
            out.append(f"imagefolder: skipped {len(self.empty_classes)} class folder(s) of train/ without readable images: {_few(self.empty_classes)}")
        if self.unreadable:
            out.append(f"imagefolder: skipped {len(self.unreadable)} unreadable image(s): "
                       + _few([f"{p} ({why})" for p, why in self.unreadable]))
        if self.other_files:
            out.append(f"imagefolder: skipped {self.other_files} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)})")
        if self.absent_from_val:
            out.append(f"imagefolder: {len(self.absent_from_val)} class(es) of train/ have no images in "
                       f"{self.val_dir.name}/ and are not measured by top-1: {_few(self.absent_from_val)}")
        return out

    def to_dict(self) -> dict:
        return {
            "classes": list(self.classes), "train_images": len(self.train), "val_images": len(self.val),
            "stray_folders": self.stray_folders, "empty_classes": self.empty_classes,
            "unreadable": [{"path": p, "error": why} for p, why in self.unreadable], "other_files": self.other_files,
        }


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _list_split(folder: Path, root: Path) -> tuple[dict[str, list[Path]], list[str], int]:
    """Class folder -> image files, stray folders (relative to ``root``), count of non-image files."""
    classes: dict[str, list[Path]] = {}
    stray: list[str] = []
    other = 0
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        if _stray(entry.name):
            stray.append(str(entry.relative_to(root)))
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry, followlinks=True):
            keep = [d for d in dirnames if not _stray(d)]
            stray += [str((Path(dirpath) / d).relative_to(root)) for d in dirnames if _stray(d)]
            dirnames[:] = sorted(keep)
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(dirpath) / f)
                elif not f.startswith("."):
                    other += 1
        classes[entry.name] = files
    return classes, stray, other


def scan_image_folder(root: str | Path, *, verify: bool = True, workers: int | None = None) -> FolderScan:
    """Scan ``root/train`` and ``root/val`` (or ``root/test``) before any training.

    Rules (issue 12): folders whose names start with ``.`` or ``__`` (``.ipynb_checkpoints``,
    ``__MACOSX``) are not classes and are skipped; class folders of ``train/`` without readable images
    are skipped (a class without training images cannot be learned) and named in :meth:`FolderScan.notes`;
    with ``verify`` every image is decoded once (:func:`verify_image`, ``workers`` threads; under
    ``torchrun`` each process decodes its share) and unreadable or truncated ones are skipped and listed.  The classes and their indices come from
    ``train/`` alone, so a class missing from ``val/`` shifts no label.

    Raises :class:`~convsim_shrink.errors.DataNotFoundError` (no ``train/`` or ``val/``) or
    :class:`~convsim_shrink.errors.ConfigError` (fewer than two classes with images in ``train/``; a
    class in ``val/`` that ``train/`` lacks; no readable image in ``val/``), each in one line.
    """
    root = Path(root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataNotFoundError(
            f"imagefolder needs --data-dir pointing at a folder with train/ and val/ sub-folders of class folders (got {root})"
        )
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not val_dir.is_dir():
        raise DataNotFoundError(f"imagefolder: {root} has train/ but no val/ (or test/) folder")
    train_files, stray, other = _list_split(train_dir, root)
    val_files, stray_v, other_v = _list_split(val_dir, root)
    unreadable: list[tuple[str, str]] = []
    if verify:
        every = [p for files in (*train_files.values(), *val_files.values()) for p in files]
        from concurrent.futures import ThreadPoolExecutor

        from ..train import distributed

        # under torchrun each process decodes its share and the (few) problems are gathered
        mine = every[distributed.rank() :: distributed.world_size()]
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            found = [[str(p), why] for p, why in zip(mine, pool.map(verify_image, mine)) if why is not None]
        problems = {p: why for part in distributed.all_gather_json(found) for p, why in part}
        bad = {p for p in every if str(p) in problems}
        unreadable = [(str(p.relative_to(root)), problems[str(p)]) for p in every if p in bad]
        train_files = {c: [p for p in fs if p not in bad] for c, fs in train_files.items()}
        val_files = {c: [p for p in fs if p not in bad] for c, fs in val_files.items()}
    classes = tuple(c for c, fs in train_files.items() if fs)
    empty = [f"train/{c}" for c, fs in train_files.items() if not fs]
    if len(classes) < 2:
        raise ConfigError(
            f"imagefolder: {train_dir} has {len(classes)} class folder(s) with readable images ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two"
        )
    index = {c: i for i, c in enumerate(classes)}
    extra = [c for c, fs in val_files.items() if fs and c not in index]
    if extra:
        raise ConfigError(
            f"imagefolder: {val_dir.name}/ has images of {len(extra)} class(es) that train/ has no images of ({_few(extra)}); "
            f"add training images or remove {val_dir.name}/{extra[0]}"
        )
    val = [(str(p), index[c]) for c, fs in val_files.items() if c in index for p in fs]
    if not val:
        raise ConfigError(f"imagefolder: {val_dir} has no readable images in class folders named as in train/")
    train = [(str(p), index[c]) for c in classes for p in train_files[c]]
    absent = [c for c in classes if not val_files.get(c)]
    return FolderScan(root, val_dir, classes, train, val, stray + stray_v, empty, unreadable, other + other_v, absent)


class _ImageList(torch.utils.data.Dataset):
    """``(transform(image), label)`` for a list of ``(path, label)``; images are converted to RGB."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return self.transform(image), label


class FolderLoader:
    """Batches of an image-folder data set through a ``DataLoader`` with workers, in an order -- and with
    augmentations -- that depend only on ``seed`` and the epoch (:meth:`set_epoch`), so a resumed run
    sees the same batches: each epoch a fresh ``DataLoader`` gets the epoch's permutation and a
    generator seeded from (seed, epoch), from which every worker's seed derives; without workers the
    transforms run under a random state forked and seeded the same way.  Training drops the last
    partial batch only when a full batch is left besides it."""

    def __init__(self, dataset, *, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
                 pin_memory: bool = False, drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.seed, self.epoch = seed, 0
        self.workers, self.pin_memory = workers, pin_memory
        self.drop_last = train if drop_last is None else drop_last
        _check_shard(rank, world_size)
        self.rank, self.world_size = rank, world_size

    sharded = TensorLoader.sharded
    rebatched = TensorLoader.rebatched

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        n = _shard_len(len(self.dataset), self.train, self.rank, self.world_size)
        return n // self.batch_size if _drops(self.drop_last, n, self.batch_size) else -(-n // self.batch_size)

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.train:
            return list(range(self.rank, n, self.world_size))
        return _train_order(n, self.seed, self.epoch, self.rank, self.world_size)

    def __iter__(self):
        seed = self.seed * 7919 + self.epoch + 1 + 1_000_003 * self.rank  # each rank its own augmentations
        order = self._order()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.workers,
            pin_memory=self.pin_memory, drop_last=_drops(self.drop_last, len(order), self.batch_size),
            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        if self.workers:
            yield from loader
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield from loader


def _folder_loaders(cfg, batch_size: int, seed: int, eval_batch_size: int | None = None, rank: int = 0, world_size: int = 1):
    from torchvision import transforms as T

    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    scan = scan_image_folder(cfg.dir or "", verify=getattr(cfg, "verify_images", True), workers=max(workers, 1))
    info = INFO["imagefolder"]
    size = cfg.image_size or 224
    normalize = T.Normalize(info.mean, info.std)
    eval_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize])
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]) if cfg.augment else eval_tf
    train_samples = scan.train
    if cfg.subset:
        targets = torch.tensor([label for _, label in train_samples])
        train_samples = [train_samples[i] for i in balanced_subset(targets, cfg.subset, seed).tolist()]
    if len(train_samples) < 2:
        raise ConfigError(f"imagefolder: {len(train_samples)} training image(s) is too few to train on; add images or raise data.subset")
    info = DataInfo("imagefolder", len(scan.classes), 3, size, info.mean, info.std, pad=0, classes=scan.classes)
    pin = torch.cuda.is_available()
    shard = {"rank": rank, "world_size": world_size}
    train = FolderLoader(_ImageList(train_samples, train_tf), batch_size=batch_size, train=True, seed=seed, workers=workers, pin_memory=pin, **shard)
    test = FolderLoader(_ImageList(scan.val, eval_tf), batch_size=eval_batch_size or batch_size, train=False, workers=workers, pin_memory=pin, **shard)
    return DataBundle(info, train, None, test, notes=scan.notes(), scan=scan)


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
        return _folder_loaders(cfg, local, seed, eval_batch_size, rank, world_size)
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


def sample_batch(loader, n: int) -> torch.Tensor:
    """The first ``n`` normalised images a loader yields (evaluation order), for measurements."""
    out, have = [], 0
    for x, _ in loader:
        out.append(x)
        have += len(x)
        if have >= n:
            break
    return torch.cat(out)[:n]


__all__ = ["INFO", "DataInfo", "DataBundle", "FolderLoader", "FolderScan", "TensorLoader", "build_data", "scan_image_folder", "verify_image", "load_arrays", "list_datasets", "balanced_subset", "read_idx", "sample_batch"]
