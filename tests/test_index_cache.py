"""The index-mapping cache gives torch-pruning's own groups and pruned models, with fewer recomputations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from convsim_shrink.prune.index_cache import cached_index_mapping


class DenseBlocks(nn.Module):
    """Concatenations that grow (a DenseNet's) and two branches concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(8 + 6 * i), nn.ReLU(), nn.Conv2d(8 + 6 * i, 6, 3, padding=1))
                                    for i in range(4))
        self.mix = nn.Conv2d(32, 16, 1)
        self.left, self.right = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = self.mix(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def pruned(model, x, ratio, global_pruning):
    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  global_pruning=global_pruning, ignored_layers=[m.head])
    groups = [[(type(dep.target.module).__name__, dep.handler.__name__, tuple(idxs)) for dep, idxs in g]
              for g in pruner.DG.get_all_groups(ignored_layers=[m.head])]
    pruner.step()
    return m, groups


@pytest.mark.parametrize("global_pruning", [False, True])
@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_the_same_groups_and_the_same_pruned_model_with_and_without_the_cache(ratio, global_pruning):
    torch.manual_seed(0)
    model = DenseBlocks().eval()
    x = torch.randn(1, 3, 16, 16)
    plain, plain_groups = pruned(model, x, ratio, global_pruning)
    with cached_index_mapping() as counters:
        before = dict(counters)
        cached, cached_groups = pruned(model, x, ratio, global_pruning)
        skipped = counters["skipped"] - before["skipped"]
    assert plain_groups == cached_groups
    a, b = plain.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in model.parameters())
    assert skipped > 0  # the unchanged mapping was not recomputed for every group
    with torch.no_grad():
        torch.testing.assert_close(plain(x), cached(x))


def test_the_cache_is_removed_after_the_outermost_block():
    from torch_pruning.dependency import index_mapping
    from torch_pruning.dependency.dependency import Dependency

    update, call = index_mapping.update_index_mapping, Dependency.__call__
    with cached_index_mapping():
        with cached_index_mapping():
            assert index_mapping.update_index_mapping is not update
        assert index_mapping.update_index_mapping is not update and Dependency.__call__ is not call
    assert index_mapping.update_index_mapping is update and Dependency.__call__ is call


def test_a_graph_pruned_between_two_blocks_is_mapped_anew():
    """A pruning outside any block is not counted: the next block must not trust the old mapping."""
    torch.manual_seed(0)
    model = DenseBlocks().eval()
    x = torch.randn(1, 3, 16, 16)
    reference = copy.deepcopy(model)
    with cached_index_mapping():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    dg.get_pruning_group(model.stem, tp.prune_conv_out_channels, [0, 1]).prune()  # outside: not counted
    ref_dg = tp.DependencyGraph().build_dependency(reference, example_inputs=x)
    ref_dg.get_pruning_group(reference.stem, tp.prune_conv_out_channels, [0, 1]).prune()
    with cached_index_mapping():
        group = dg.get_pruning_group(model.layers[2][2], tp.prune_conv_out_channels, [1, 4])
    expected = ref_dg.get_pruning_group(reference.layers[2][2], tp.prune_conv_out_channels, [1, 4])
    assert [tuple(i) for _, i in group] == [tuple(i) for _, i in expected]
