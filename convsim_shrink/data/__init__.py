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

Modules: :mod:`.presets` (what each data set is), :mod:`.formats` (reading IDX and CIFAR files),
:mod:`.locate` (finding or downloading them: :func:`load_arrays`), :mod:`.loaders` (:class:`TensorLoader`,
:class:`DataBundle`, subsets, sharding), :mod:`.folders` (image folders), :mod:`.build` (:func:`build_data`).
"""

from .build import build_data
from .folders import FolderLoader, FolderScan, scan_image_folder, verify_image
from .formats import read_idx
from .loaders import DataBundle, TensorLoader, balanced_subset, sample_batch
from .locate import load_arrays
from .presets import INFO, DataInfo, list_datasets

__all__ = ["INFO", "DataInfo", "DataBundle", "FolderLoader", "FolderScan", "TensorLoader", "build_data", "scan_image_folder", "verify_image", "load_arrays", "list_datasets", "balanced_subset", "read_idx", "sample_batch"]
