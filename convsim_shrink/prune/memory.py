"""Giving memory back between the pruned copies of a large model.

Each trial pruning and each candidate of the target search is a deep copy of the model with a
torch-pruning dependency graph; the graph and the copy hold each other (reference cycles), so a dropped
copy waits for Python's cyclic garbage collector, which runs rarely once objects are old.  And glibc's
``malloc`` keeps freed blocks below its mmap threshold (up to 32 MB: most of a model's tensors) in the
process's heap.  On vit_b_32 the plan alone left 0.43 GB of dead tensors in cycles and 2.6 GB of resident
memory for a 0.33 GB model; a garbage collection and ``malloc_trim`` brought it to 1.06 GB.  Under an
address-space cap (``ulimit -v``) the held memory counts as used, and 300-600 M-parameter models ran out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

from torch import nn

#: below this many parameters (0.4 GB in float32) a copy is small: collecting before every one only costs time
#: (a collection and a trim took about 0.5 s a candidate on resnet50, 25 M parameters: 3 % of its prune stage)
LARGE_PARAMS = 100_000_000

_LIBC: list = []


def _malloc_trim() -> None:
    if not sys.platform.startswith("linux"):
        return
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))
        except OSError:
            _LIBC.append(None)
    libc = _LIBC[0]
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None  # glibc only (not musl)
    if trim is not None:
        trim(0)


def release_memory(model: nn.Module | None = None, *, force: bool = False) -> bool:
    """Collect garbage cycles and return freed heap memory to the system (glibc's ``malloc_trim``), when
    ``model`` has at least :data:`LARGE_PARAMS` parameters (or ``force``).  Returns whether it did."""
    if not force and (model is None or sum(p.numel() for p in model.parameters()) < LARGE_PARAMS):
        return False
    gc.collect()
    _malloc_trim()
    return True
