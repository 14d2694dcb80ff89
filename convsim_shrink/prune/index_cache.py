"""Torch-pruning's index mapping, recomputed only when a pruning has changed the graph.

Torch-pruning (1.6.1) recomputes the channel index mapping of every concatenation, split, reshape,
slice and expand of the whole graph (``dependency.index_mapping.update_index_mapping``) at the start of
*every* ``DependencyGraph.get_pruning_group`` call, and it builds one group per prunable layer several
times in each pruning (counting channels, scoring, then pruning).  The mapping depends only on the graph
and on the channel counts, which change only when a group is pruned.  On a model with many
concatenations this recomputation is most of the work: on densenet121 at 224 px (58 concatenations)
one global pruning took 5.1 s, of which 3.6 s recomputed unchanged mappings (2-core CPU, docs/BENCHMARKS.md).

:func:`cached_index_mapping` counts every pruning operation torch-pruning applies (each
``Dependency`` call: that is how ``Group.prune`` prunes) and recomputes a graph's mapping only when
something was pruned since that graph's last recomputation, anywhere in the process (a graph mapped
in an earlier block is recomputed once: prunings between blocks are not counted).  The mapping it
leaves is the one torch-pruning would compute; a pruning applied without a ``Dependency`` (calling
``tp.prune_conv_out_channels`` directly inside the block) would not be seen, and nothing here does that.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency.dependency import Dependency

_ORIGINAL_UPDATE = _index_mapping.update_index_mapping
_ORIGINAL_CALL = Dependency.__call__
_LOCK = threading.Lock()
_STATE = {"depth": 0, "epoch": 0, "prunings": 0, "recomputed": 0, "skipped": 0}
#: set on a DependencyGraph: (outermost block, pruning count) its mapping was computed at
_ATTR = "_convsim_mapped_at"


def _counting_call(self, idxs):
    _STATE["prunings"] += 1
    return _ORIGINAL_CALL(self, idxs)


def _cached_update(graph) -> None:
    now = (_STATE["epoch"], _STATE["prunings"])
    if getattr(graph, _ATTR, None) == now:
        _STATE["skipped"] += 1
        return
    _ORIGINAL_UPDATE(graph)
    setattr(graph, _ATTR, now)
    _STATE["recomputed"] += 1


def pruning_epoch() -> tuple[int, int]:
    """(outermost block, prunings counted in it): changes whenever a graph's channel counts may have changed."""
    return _STATE["epoch"], _STATE["prunings"]


@contextlib.contextmanager
def cached_index_mapping() -> Iterator[dict]:
    """Inside the block, torch-pruning recomputes a graph's index mapping only after a pruning.

    Re-entrant (the outermost block installs and removes the cache).  Yields the counters
    (``recomputed``, ``skipped``, ``prunings``; process-wide, for tests and benchmarks).
    """
    with _LOCK:
        _STATE["depth"] += 1
        if _STATE["depth"] == 1:
            _STATE["epoch"] += 1  # prunings between two blocks are not counted: mappings of earlier blocks are stale
            _index_mapping.update_index_mapping = _cached_update
            Dependency.__call__ = _counting_call
    try:
        yield _STATE
    finally:
        with _LOCK:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                _index_mapping.update_index_mapping = _ORIGINAL_UPDATE
                Dependency.__call__ = _ORIGINAL_CALL
