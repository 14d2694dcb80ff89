"""Loaders of in-memory data sets (:class:`TensorLoader`: uint8 tensors augmented a batch at a time),
the bundle of a run's loaders (:class:`DataBundle`), class-balanced subsets, and the sharding rules
every loader follows under several processes (see the package's docstring)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .presets import DataInfo

if TYPE_CHECKING:
    from .folders import FolderScan


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


def drops_last(drop_last: bool, n: int, batch_size: int) -> bool:
    """Drop the last partial batch only when a full batch is left besides it: a training set smaller
    than one batch trains on that one partial batch instead of silently training zero steps."""
    return drop_last and n >= batch_size


def train_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the epoch's training order: ``DistributedSampler``'s permutation of
    ``range(n)`` seeded by ``seed * 100_003 + epoch`` (with one process: that permutation itself)."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed * 100_003, drop_last=False
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def shard_len(n: int, train: bool, rank: int, world_size: int) -> int:
    """Images one rank sees per epoch: training pads to a multiple of the processes, evaluation does not."""
    return -(-n // world_size) if train else len(range(rank, n, world_size))


def check_shard(rank: int, world_size: int) -> None:
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
        check_shard(rank, world_size)
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
        check_shard(rank, world_size)
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
            return torch.tensor(train_order(n, self.seed, self.epoch, self.rank, self.world_size), dtype=torch.long)
        return torch.arange(n)[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = shard_len(len(self.labels), self.train, self.rank, self.world_size)
        return n // self.batch_size if drops_last(self.drop_last, n, self.batch_size) else -(-n // self.batch_size)

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
        stop = len(idx) - (len(idx) % self.batch_size if drops_last(self.drop_last, len(idx), self.batch_size) else 0)
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


def sample_batch(loader, n: int) -> torch.Tensor:
    """The first ``n`` normalised images a loader yields (evaluation order), for measurements."""
    out, have = [], 0
    for x, _ in loader:
        out.append(x)
        have += len(x)
        if have >= n:
            break
    return torch.cat(out)[:n]
