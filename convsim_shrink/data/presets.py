"""What the code knows about each data set by name: classes, channels, image size, normalisation and
the training preset's augmentation (:class:`DataInfo`, :data:`INFO`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
