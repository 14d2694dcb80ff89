"""Memory given back between pruned copies (convsim_shrink.prune.memory)."""

import gc
import weakref

import torch
from torch import nn

from convsim_shrink.prune import memory


class _Cycle(nn.Module):
    """A module that holds itself through an attribute: freed only by the cyclic collector (as torch-pruning's
    dependency graph and the copy it was built on are)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8))
        self.__dict__["me"] = self


def test_a_large_models_dropped_copies_in_cycles_are_collected(monkeypatch):
    gc.disable()  # as when the collector has not come round yet
    try:
        dropped = weakref.ref(_Cycle())
        assert dropped() is not None  # a cycle: not freed by reference counting
        small = nn.Linear(4, 4)
        assert memory.release_memory(small) is False and dropped() is not None  # small models: nothing done
        monkeypatch.setattr(memory, "LARGE_PARAMS", 10)
        assert memory.release_memory(small) is True and dropped() is None
        kept = _Cycle()
        assert memory.release_memory(force=True) is True and kept.weight.shape == (8,)  # live objects stay
    finally:
        gc.enable()
