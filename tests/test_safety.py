"""The kinds of model torch-pruning crashes on or silently breaks (issue 12), as tiny models: each must
prune without an exception, still run, keep its output shape and its output layer, and say why layers
were left alone."""

import copy
import functools
import sys

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from convsim_shrink.errors import ConvSimError, TargetUnreachableError
from convsim_shrink.prune.safety import (
    IgnorePlan,
    PruningError,
    output_signature,
    plan_ignored_layers,
    prune_safely,
    raised_in_torch_pruning,
    tolerant_tracing,
    verify_pruned,
)
from convsim_shrink.prune.search import prune_to_target

from helpers import (
    KINDS,
    AuxHead,
    ConvClassifier,
    LogitsAndFeatures,
    PixelShuffleNet,
    SplitCat,
    TensorSplitResidual,
    TinyShuffle,
)

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class ChannelShuffle(nn.Module):
    """A hand-written channel shuffle: torch-pruning, tolerant or not, would map channels 1:1 through it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.c2(x).mean((2, 3)))


def _prune(model, ignored_layers, *, global_pruning=False, target=0.5):
    return prune_to_target(
        model, X, tp.importance.MagnitudeImportance(), target_params=target, global_pruning=global_pruning,
        ignored_layers=ignored_layers, warn=False, tolerance=0.05,
    )


def _out_layer(model, name):
    return dict(model.named_modules())[name]




@pytest.mark.parametrize("make,kind,output_layer", KINDS, ids=[k[0].__name__ for k in KINDS])
def test_each_failing_kind_prunes_runs_and_keeps_its_outputs(make, kind, output_layer):
    torch.manual_seed(0)
    model = make().eval()
    before = output_signature(model, X)
    plan = plan_ignored_layers(model, X)
    assert not plan.refused
    assert output_layer in plan and plan.entries[0].kind == "output"
    if kind is not None:
        assert any(e.kind == kind for e in plan.entries), plan.summary()
        assert kind in [e.kind for e in plan.left_alone()]
    assert output_layer in plan.summary() and "\n" not in plan.summary()
    with tolerant_tracing():
        result = _prune(model, plan)
    pruned = result.model
    assert result.params_ratio <= 0.5
    verify_pruned(pruned, X, before)  # runs in both modes, same output shapes
    out_before, out_after = _out_layer(model, output_layer), _out_layer(pruned, output_layer)
    assert out_after.weight.shape[0] == out_before.weight.shape[0]  # every class score kept
    # the layers left alone keep every output channel
    for name in plan.names:
        assert _out_layer(pruned, name).weight.shape[0] == _out_layer(model, name).weight.shape[0]


def test_these_kinds_do_fail_without_a_plan():
    """The reason the plan exists: torch-pruning raises (or silently changes the outputs) on each kind."""
    for make in (TinyShuffle, SplitCat, PixelShuffleNet):
        torch.manual_seed(0)
        model = make().eval()
        with pytest.raises(Exception) as err:  # noqa: PT011 - torch-pruning raises several kinds
            _prune(model, [model.fc])
        assert raised_in_torch_pruning(err.value), f"{make.__name__} failed outside torch-pruning: {err.value!r}"
    torch.manual_seed(0)
    model = ConvClassifier().eval()
    result = _prune(model, [])  # the class-score conv is pruned: the output shape changes
    with pytest.raises(PruningError, match="output shape"):
        verify_pruned(result.model, X, output_signature(model, X))


def test_global_pruning_also_works_on_the_planned_kinds():
    for make in (SplitCat, PixelShuffleNet, AuxHead):
        torch.manual_seed(0)
        model = make().eval()
        before = output_signature(model, X)
        plan = plan_ignored_layers(model, X)
        with tolerant_tracing():
            result = _prune(model, plan, global_pruning=True)
        verify_pruned(result.model, X, before)  # raises PruningError when the pruned model broke
        assert result.params_ratio <= 0.5, make.__name__  # and it was pruned to the target, not left whole


def test_every_output_tensor_keeps_its_producer():
    torch.manual_seed(0)
    model = LogitsAndFeatures().eval()
    plan = plan_ignored_layers(model, X)
    assert {"fc", "c2"} <= set(plan.names)  # the features are an output too
    result = _prune(model, plan, target=0.8)
    verify_pruned(result.model, X, output_signature(model, X))


@pytest.mark.parametrize("make,culprit", [(SplitCat, {"cv1", "m"}), (PixelShuffleNet, {"c1"})])
def test_trials_alone_find_the_groups_that_crash(make, culprit):
    """With the static rules off (but the output layers kept), the trials find the crashing group."""
    torch.manual_seed(0)
    model = make().eval()
    plan = plan_ignored_layers(model, X, rules=("output",))
    trial = [e for e in plan.entries if e.kind == "trial"]
    assert trial and {e.name for e in trial} <= culprit
    assert "IndexError" in trial[0].reason  # torch-pruning's own error, as a reason, not a traceback
    assert plan.trials > 1
    result = _prune(model, plan)
    verify_pruned(result.model, X, output_signature(model, X))


def test_function_check_catches_channels_wired_to_the_wrong_weights():
    """Through a channel shuffle torch-pruning prunes without error but removes the wrong input channels
    of the next conv: only comparing outputs with the removed channels made dead shows it."""
    torch.manual_seed(0)
    model = ChannelShuffle().eval()
    shape_only = plan_ignored_layers(model, X, rules=("output",), check_function=False)
    assert shape_only.names == ["fc"]  # structurally the pruned model is fine
    checked = plan_ignored_layers(model, X, rules=("output",))
    assert "c1" in checked and "kept" in checked.entries[-1].reason
    assert plan_ignored_layers(model, X).entries[-1].kind == "reshape"  # the static rule knows it upfront


class ResidualSE(nn.Module):
    """What torch-pruning handles: residual blocks, a depthwise conv and squeeze-excitation."""

    def __init__(self):
        super().__init__()
        from torchvision.models.resnet import BasicBlock
        from torchvision.ops import SqueezeExcitation

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish())
        self.se = SqueezeExcitation(16, 8)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.se(self.dw(self.blocks(self.stem(x)))).mean((2, 3)))


def test_function_check_passes_on_models_torch_pruning_handles():
    torch.manual_seed(0)
    plan = plan_ignored_layers(ResidualSE().eval(), X)
    assert plan.trials == 1 and not plan.left_alone(), plan.summary()


def test_function_check_follows_norms_cut_by_several_groups():
    """DenseNet's norms over concatenations lose channels to several groups, each in the indexing the
    previous ones left: the check must map them back to the original channels."""
    from torchvision.models.densenet import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10).eval()
    plan = plan_ignored_layers(model, X)
    assert plan.trials == 1 and not plan.left_alone(), plan.summary()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_function_check_passes_on_torchvision_models(name):
    torch.manual_seed(0)
    plan = plan_ignored_layers(torchvision.models.get_model(name, num_classes=10).eval(), X)
    assert plan.trials == 1 and not plan.left_alone(), plan.summary()


def test_planning_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = AuxHead().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan_ignored_layers(model, X)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running stats untouched by the training-mode passes


def test_plan_binds_to_copies_by_name():
    torch.manual_seed(0)
    model = SplitCat().eval()
    plan = plan_ignored_layers(model, X, trials=False)
    assert [m for m in plan] == [_out_layer(model, n) for n in plan.names]
    twin = copy.deepcopy(model)
    bound = plan.for_model(twin)
    assert all(a is _out_layer(twin, n) for a, n in zip(bound, plan.names))
    assert bound.to_dict()["ignored"][0] == {"layer": "fc", "rule": "output", "reason": plan.entries[0].reason}
    assert isinstance(IgnorePlan().summary(), str)


def test_verify_pruned_reports_a_model_that_no_longer_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    model(X)
    signature = output_signature(model, X)
    model[0] = nn.Conv2d(3, 2, 3)  # what a mis-mapped prune leaves behind
    with pytest.raises(PruningError, match="no longer runs") as err:
        verify_pruned(model, X, signature)
    assert "\n" not in str(err.value)
    with pytest.raises(PruningError, match="output shape"):
        verify_pruned(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)), X, (1, 5))


def test_tolerant_tracing_restores_torch_pruning():
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    with tolerant_tracing():
        assert index_mapping.update_reshape_index_mapping is not original
    assert index_mapping.update_reshape_index_mapping is original


def test_prune_safely_turns_torch_pruning_errors_into_one_line():
    torch.manual_seed(0)
    model = SplitCat().eval()
    calls = []

    def broken(ignored_layers):
        calls.append(len(list(ignored_layers)))
        # an error from inside torch-pruning's code: a group of the unplanned model
        tp.pruner.MetaPruner(model, X, tp.importance.MagnitudeImportance(), ignored_layers=[model.fc]).step()

    with pytest.raises(PruningError) as err:
        prune_safely(copy.deepcopy(model), X, broken)
    assert isinstance(err.value, ConvSimError) and "IndexError" in str(err.value) and "\n" not in str(err.value)
    assert len(calls) == 1  # the harsher re-plan found nothing more to leave alone: no blind retry


def test_prune_safely_keeps_our_own_bugs_as_tracebacks():
    torch.manual_seed(0)
    model = PixelShuffleNet().eval()

    def buggy(ignored_layers):
        raise TypeError("a bug in the caller, not in torch-pruning")

    with pytest.raises(TypeError):
        prune_safely(model, X, buggy)


def test_prune_safely_passes_user_errors_through_and_returns_the_plan():
    torch.manual_seed(0)
    model = PixelShuffleNet().eval()
    prune = functools.partial(prune_to_target, model, X, tp.importance.MagnitudeImportance(), target_params=0.5, warn=False, tolerance=0.05)
    result, plan = prune_safely(model, X, prune)
    assert "c1" in plan and result.params_ratio <= 0.5
    with pytest.raises(TargetUnreachableError):
        prune_safely(model, X, functools.partial(prune, target_params=0.001, max_layer_ratio=0.5), plan=plan)


def test_prune_safely_retries_with_a_wider_plan():
    """A failure the first plan missed (its trials pruned gently): the retry's harsher trials find it."""
    torch.manual_seed(0)
    model = PixelShuffleNet().eval()
    plan = plan_ignored_layers(model, X, rules=("output",), trials=False)
    result, final = prune_safely(model, X, functools.partial(_prune, model), plan=plan, rules=("output",))
    assert "c1" in final and final.trials > 0
    verify_pruned(result.model, X, output_signature(model, X))


@pytest.mark.slow
@pytest.mark.parametrize("name,global_pruning", [("shufflenet_v2_x0_5", True), ("squeezenet1_1", False), ("googlenet", False)])
def test_torchvision_models_from_the_issue(name, global_pruning):
    torch.manual_seed(0)
    kwargs = {"init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, num_classes=10, **kwargs).eval()
    before = output_signature(model, X)
    prune = functools.partial(
        prune_to_target, model, X, tp.importance.MagnitudeImportance(), target_params=0.6,
        global_pruning=global_pruning, warn=False, tolerance=0.05,
    )
    result, plan = prune_safely(model, X, prune)
    verify_pruned(result.model, X, before)
    assert result.params_ratio <= 0.6
    assert plan.entries[0].kind == "output"
    if name == "squeezenet1_1":  # only its class-score conv is kept whole: nothing else is left alone
        assert "classifier.1" in plan.names
    else:  # channel shuffles / training-only heads: layers left alone, with a reason
        assert plan.left_alone()


# ------------------------------------------------------------------ limits on torch-pruning's graph work (issue 24)


def test_bounded_stops_a_runaway_loop_and_names_the_module_it_was_at():
    import signal

    from convsim_shrink.prune.safety import GraphLimitError, GraphLimits, bounded, graph_limits

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
    before = signal.getsignal(signal.SIGALRM)

    def walk(node):  # a stand-in for torch-pruning's walk: a local holds the module it is following
        while True:
            node = node

    with graph_limits(GraphLimits(seconds=0.5)), pytest.raises(GraphLimitError) as err:
        with bounded("walking", model):
            walk(model[1])
    assert err.value.module == "1"
    assert str(err.value) == "torch-pruning passed its time limit of 0.5 s (prune.graph_seconds) while walking at 1"
    assert signal.getsignal(signal.SIGALRM) is before  # the caller's handler is back


def test_time_the_process_did_not_get_does_not_count_against_the_limit():
    """On a busy machine other jobs take the CPU: the limit is the less of wall and CPU time, so waiting
    (here: sleeping, the CPU given away) does not trip it, and a busy walk of the same length does."""
    import time

    from convsim_shrink.prune.safety import GraphLimitError, GraphLimits, bounded, graph_limits

    with graph_limits(GraphLimits(seconds=0.4)):
        with bounded("waiting"):
            time.sleep(1.2)  # 3x the limit in wall time, almost no CPU time
        with pytest.raises(GraphLimitError, match="time limit of 0.4 s"):
            with bounded("busy"):
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    pass


def test_bounded_stops_runaway_memory_and_lets_quick_work_through():
    from convsim_shrink.prune.safety import GraphLimitError, GraphLimits, bounded, graph_limits
    from convsim_shrink.prune.safety.limits import resident_bytes

    if resident_bytes() is None:
        pytest.skip("resident memory is not readable here (/proc)")
    hoard = []
    with graph_limits(GraphLimits(seconds=60, memory_gb=0.05)):
        with bounded("quick work"):
            total = sum(range(1000))
        assert total == 499500
        with pytest.raises(GraphLimitError, match=r"memory limit of 0.05 GB \(prune.graph_memory_gb; it had grown by"):
            with bounded("hoarding"):
                while True:
                    hoard.append(bytearray(1 << 20))
    del hoard


def _shrinks_to_half(model, x, plan):
    prune = functools.partial(prune_to_target, model, x, tp.importance.MagnitudeImportance(), target_params=0.5, global_pruning=True)
    result, plan = prune_safely(model, x, prune, plan=plan)
    assert 0.45 <= result.params_ratio <= 0.5 and (result.params_ratio >= 0.49 or "more than 0.01 below" in result.note)
    assert result.model(x).shape == (2, 10)
    return result


class GatesBeforeConcat(nn.Module):
    """``depth`` element-wise gates between a conv and a concatenation of two slices of its output (as
    swin_s's patch merging).  ``"relu"``, ``relu(x) + 0``: two nodes a gate, so 300 gates are 600 nodes, past
    the 500 steps after which torch-pruning's channel inference gives up (its graph build fails with a
    TypeError).  ``"swish"``, ``x * sigmoid(x)``: each gate reaches ``x`` by two paths, so the inference
    visits ``conv1`` once per path, 2^depth times."""

    GATES = {"relu": lambda x: torch.relu(x) + 0.0, "swish": lambda x: x * torch.sigmoid(x)}

    def __init__(self, depth: int, gate: str):
        super().__init__()
        self.depth, self.gate = depth, self.GATES[gate]
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 1), nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(x)
        for _ in range(self.depth):
            x = self.gate(x)
        x = self.conv2(torch.cat([x[:, :, 0::2], x[:, :, 1::2]], 1))
        return self.head(x.mean((2, 3)))


def test_a_deep_walk_to_a_concatenation_is_inferred_not_refused():
    torch.manual_seed(0)
    model = GatesBeforeConcat(300, "relu").eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError):  # torch-pruning alone, at its own cap
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
    plan = plan_ignored_layers(model, x)
    assert plan.refused is None, plan.summary()
    result = _shrinks_to_half(model, x, plan)
    assert result.model.conv1.out_channels < 16
    from torch_pruning.dependency import constants

    assert constants.MAX_RECURSION_DEPTH == 500  # restored after our calls


def test_a_walk_through_many_diamonds_visits_each_node_once():
    from torch_pruning.dependency import shape_infer

    torch.manual_seed(0)
    model = GatesBeforeConcat(40, "swish").eval()
    x = torch.randn(2, 3, 8, 8)
    frames = sys.getrecursionlimit()
    plan = plan_ignored_layers(model, x)  # without the memo: a million steps, then refused with the TypeError
    assert plan.refused is None, plan.summary()
    result = _shrinks_to_half(model, x, plan)
    assert result.model.conv1.out_channels < 16
    assert not hasattr(shape_infer.infer_out_channels_recursively, "__wrapped__")  # torch-pruning's own again
    assert sys.getrecursionlimit() == frames


def test_a_walk_round_a_cycle_stops_at_its_bounds_not_at_the_time_limit():
    """A miniature swin_v2 (torchvision's own blocks): the residual streams' and the position-bias MLPs'
    groups go round a flatten cycle, multiplying their indices by 32 a pass; they ran to the time or memory
    limit (16 groups of swin_v2_t at 60-120 s each), and now stop once the indices pass the model's size."""
    from torch_pruning.dependency import group, index_mapping
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    from convsim_shrink.prune.safety import GraphLimits, graph_limits

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    originals = (index_mapping._FlattenIndexMapping.__call__, group.Group.add_dep)
    with graph_limits(GraphLimits(seconds=60.0)):
        plan = plan_ignored_layers(model, x)
    assert plan.refused is None, plan.summary()
    stopped = {e.name for e in plan.entries if e.kind == "graph-limit"}
    assert {"features.1.0.mlp.3", "features.1.0.attn.cpb_mlp.2"} <= stopped, plan.summary()
    assert all("a bound on its walk" in e.reason for e in plan.entries if e.kind == "graph-limit"), plan.summary()
    assert (index_mapping._FlattenIndexMapping.__call__, group.Group.add_dep) == originals  # torch-pruning's own again
    result, _ = prune_safely(model, x, functools.partial(prune_to_target, model, x, tp.importance.MagnitudeImportance(),
                                                         target_params=0.8, global_pruning=False), plan=plan)
    assert result.params_ratio < 0.95 and result.model(x).shape == (1, 10)  # the other layers prune


def test_the_index_limit_stops_a_flatten_mapping_before_it_builds_the_list():
    from torch_pruning import _helpers
    from torch_pruning.dependency import index_mapping

    from convsim_shrink.prune.safety import GraphLimitError, GraphLimits, bounded, graph_limits

    mapping = index_mapping._FlattenIndexMapping(stride=32)
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(100)]
    with graph_limits(GraphLimits(max_indices=3200)), bounded("mapping"):
        assert len(mapping(idxs)) == 3200  # at the limit: allowed
    with graph_limits(GraphLimits(max_indices=3199)), bounded("mapping"), pytest.raises(GraphLimitError, match="3,199"):
        mapping(idxs)
    assert len(mapping(idxs)) == 3200  # outside bounded: torch-pruning's own


@pytest.mark.parametrize("walk_bounds", [True, False])
def test_a_group_torch_pruning_cannot_finish_is_left_alone_and_the_rest_prunes(walk_bounds, monkeypatch):
    from convsim_shrink.prune.safety import GraphLimits, graph_limits, limits

    torch.manual_seed(0)
    model = TensorSplitResidual().eval()  # the walk of branch.0's group never ends
    x = torch.randn(2, 3, 16, 16)
    if not walk_bounds:  # the time limit alone (the backstop for a cycle the walk's bounds do not see)
        monkeypatch.setattr(limits, "MAX_DEP_REPEATS", 10**9)
    bounds = GraphLimits(seconds=8.0, max_indices=None if walk_bounds else 10**12)
    with graph_limits(bounds):  # building any other group here takes well under a second, even on a busy machine
        plan = plan_ignored_layers(model, x)
        assert plan.refused is None
        entry = next(e for e in plan.entries if e.kind == "graph-limit")
        assert entry.name == "branch.0"
        if walk_bounds:  # the walk re-adds its dependencies with shifted indices: stopped after a few passes
            assert f"reached one dependency more than {limits.MAX_DEP_REPEATS} times" in entry.reason, entry.reason
        else:
            assert "within its time limit of 8 s (prune.graph_seconds)" in entry.reason, entry.reason
        result = _shrinks_to_half(model, x, plan)
    assert result.model.branch[0].out_channels == model.branch[0].out_channels


def test_a_dependency_graph_past_its_limit_refuses_in_one_line_naming_the_module(monkeypatch):
    from convsim_shrink.prune.safety import GraphLimits, graph_limits

    def endless(self, model, example_inputs, **kw):  # as a graph build that never ends, at one module
        module = model.features[1]
        while True:
            module = module

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", endless)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    model.pool, model.flat, model.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    with graph_limits(GraphLimits(seconds=0.5)):
        plan = plan_ignored_layers(model, torch.randn(1, 3, 12, 12))
    assert plan.refused == ("torch-pruning passed its time limit of 0.5 s (prune.graph_seconds) while building the "
                            "dependency graph at features.1")
    with pytest.raises(ConvSimError, match="^cannot prune this model: torch-pruning passed its time limit"):
        prune_safely(model, torch.randn(1, 3, 12, 12), lambda ignored_layers: None, plan=plan)


@pytest.mark.parametrize("where", ["search", "trial"])
def test_running_out_of_memory_is_one_line_not_a_refusal_or_a_failing_group(where, monkeypatch):
    """regnet_y_128gf was 'refused' with 'pruning failed ... trials found no layer to leave alone: torch-pruning
    raised RuntimeError: ... can't allocate memory' under the coverage benchmark's memory cap, and an out of
    memory in a trial would have marked a good group as failing: both are now OutOfMemoryError."""
    from convsim_shrink.errors import OutOfMemoryError
    from convsim_shrink.prune.safety import trials

    torch.manual_seed(0)
    model = TensorSplitResidual().eval()
    x = torch.randn(2, 3, 16, 16)
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes.")

    def out_of_memory(*args, **kwargs):
        raise oom

    if where == "trial":
        monkeypatch.setattr(trials.copy, "deepcopy", out_of_memory)  # copying the model for a trial
        with pytest.raises(OutOfMemoryError, match="ran out of memory while .*can.t allocate memory.*more memory is free"):
            plan_ignored_layers(model, x)
    else:
        with pytest.raises(OutOfMemoryError, match=r"pruning copies of the model \(0\.0 M parameters.*more memory is free"):
            prune_safely(model, x, out_of_memory, plan=plan_ignored_layers(model, x, trials=False))
        model(x).sum().backward()  # gradients, as a Taylor criterion leaves them: the line names the lighter setting
        with pytest.raises(OutOfMemoryError, match=r"more memory is free or with a criterion that needs no gradients \(--criterion lamp"):
            prune_safely(model, x, out_of_memory, plan=plan_ignored_layers(model, x, trials=False))
