"""Image folders (``train/`` and ``val/`` of class sub-folders): scanning and verifying them before
training (:func:`scan_image_folder`) and reading them through a ``DataLoader`` with workers
(:class:`FolderLoader`) in an order that depends only on the seed and the epoch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DataNotFoundError, first_line
from .loaders import (
    DataBundle,
    TensorLoader,
    balanced_subset,
    check_shard,
    drops_last,
    shard_len,
    train_order,
)
from .presets import INFO, DataInfo

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
        check_shard(rank, world_size)
        self.rank, self.world_size = rank, world_size

    sharded = TensorLoader.sharded
    rebatched = TensorLoader.rebatched

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        n = shard_len(len(self.dataset), self.train, self.rank, self.world_size)
        return n // self.batch_size if drops_last(self.drop_last, n, self.batch_size) else -(-n // self.batch_size)

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.train:
            return list(range(self.rank, n, self.world_size))
        return train_order(n, self.seed, self.epoch, self.rank, self.world_size)

    def __iter__(self):
        seed = self.seed * 7919 + self.epoch + 1 + 1_000_003 * self.rank  # each rank its own augmentations
        order = self._order()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.workers,
            pin_memory=self.pin_memory, drop_last=drops_last(self.drop_last, len(order), self.batch_size),
            generator=torch.Generator().manual_seed(seed), persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        if self.workers:
            yield from loader
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield from loader


def folder_loaders(cfg, batch_size: int, seed: int, eval_batch_size: int | None = None, rank: int = 0, world_size: int = 1):
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
