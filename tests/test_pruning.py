import warnings

import pytest
import torch
from torch import nn

from convsim_shrink.errors import ConfigError, TargetUnreachableError
from convsim_shrink.models import classifier_of, create_model
from convsim_shrink.pruning import channel_counts, iterative_prune, measure, prune_to_target
from convsim_shrink.ranking import make_importance

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # drawn at import: its own generator


@pytest.mark.parametrize("global_pruning", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "mobilenet_v2"])
def test_params_target_holds_within_one_percent(name, global_pruning):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, width=0.25)
    result = prune_to_target(model, X, make_importance("convsim"), target_params=0.5, global_pruning=global_pruning)
    assert 0.49 <= result.params_ratio <= 0.50
    pruned = result.model
    # measured independently of the result object
    assert sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters()) == pytest.approx(result.params_ratio, abs=1e-9)
    # still trains: forward and backward
    pruned.train()
    pruned(torch.randn(4, 1, 28, 28)).logsumexp(1).mean().backward()
    assert classifier_of(pruned).out_features == 10  # classifier outputs never pruned
    assert all(c >= 1 for c in channel_counts(pruned).values())
    # the original is untouched
    assert measure(model, X).params == result.base.params


def test_macs_target_holds():
    model = create_model("resnet18", in_channels=1, width=0.25)
    result = prune_to_target(model, X, make_importance("l1"), target_macs=0.3)
    assert 0.29 <= result.macs_ratio <= 0.30


def test_round_to_gives_multiples():
    model = create_model("vgg11_bn", in_channels=1, width=0.5)
    result = prune_to_target(model, X, make_importance("l2"), target_params=0.5, round_to=8, tolerance=0.03)
    for name, c in channel_counts(result.model).items():
        if name != "classifier":
            assert c % 8 == 0, (name, c)
    assert result.params_ratio <= 0.5


def test_unreachable_target_names_smallest_size():
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    with pytest.raises(TargetUnreachableError, match=r"smallest reachable is 0\.2\d\d of the params"):
        prune_to_target(model, X, make_importance("l1"), target_params=0.001, max_layer_ratio=0.5)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2])
def test_out_of_range_target(bad):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        prune_to_target(create_model("simple_cnn"), torch.zeros(1, 3, 32, 32), make_importance("l1"), target_params=bad)


def test_iterative_pruning_reaches_target_and_calls_between():
    model = create_model("resnet18", in_channels=1, width=0.25)
    seen = []
    result = iterative_prune(
        model, X, lambda: make_importance("convsim"), steps=3, target_params=0.4,
        between=lambda m, step: seen.append((step, measure(m, X).params)),
    )
    base = measure(model, X).params
    assert [s for s, _ in seen] == [1, 2]
    assert seen[0][1] / base == pytest.approx(0.8, abs=0.011) and seen[1][1] / base == pytest.approx(0.6, abs=0.011)
    assert 0.39 <= result.params_ratio <= 0.40


def test_every_criterion_prunes_to_target():
    for name in ["convsim", "l1", "l2", "taylor", "fpgm", "lamp", "bn-scale", "random"]:
        torch.manual_seed(4)
        model = create_model("simple_cnn", in_channels=1, width=0.5)
        if name == "taylor":
            model(torch.randn(8, 1, 28, 28)).logsumexp(1).mean().backward()
        result = prune_to_target(model, X, make_importance(name), target_params=0.5, tolerance=0.02)
        assert 0.48 <= result.params_ratio <= 0.5, name


def test_custom_module_through_the_python_api():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    result = prune_to_target(model, X, make_importance("convsim"), target_params=0.5, tolerance=0.03)
    assert result.params_ratio <= 0.5 and result.model[-1].out_features == 10


def test_rounding_that_would_empty_a_layer_still_reaches_the_target():
    # 16-channel layers rounded to 8: at a 0.9 ratio they would round to 0 and be left whole
    model = create_model("simple_cnn", in_channels=1, width=0.5)
    result = prune_to_target(model, X, make_importance("l1"), target_params=0.5, round_to=8, tolerance=0.1)
    assert result.params_ratio <= 0.5


@pytest.mark.parametrize("criterion", ["lamp", "convsim"])
def test_global_pruning_with_rounding_lands_in_the_window(criterion):
    # with round_to=8 one step of the global threshold moves this model's size from 0.501 to 0.480 (lamp):
    # the refinement gives channels back group by group until the size is in the window
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, width=0.25)
    result = prune_to_target(model, X, make_importance(criterion), target_params=0.5, global_pruning=True, round_to=8)
    assert 0.49 <= result.params_ratio <= 0.50
    for name, c in channel_counts(result.model).items():
        if name != "fc":
            assert c % 8 == 0, (name, c)


def test_a_missed_window_is_a_note_and_optionally_a_warning():
    # simple_cnn at width 0.25 has 8..16 channels per layer: with round_to=8 no size lands near 0.5
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False must stay silent
        quiet = prune_to_target(model, X, make_importance("l2"), target_params=0.5, round_to=8, tolerance=0.001, warn=False)
    assert quiet.params_ratio < 0.499 and quiet.note.startswith(f"pruned to {quiet.params_ratio:.4f}")
    with pytest.warns(UserWarning, match="more than 0.001 below the target"):
        loud = prune_to_target(model, X, make_importance("l2"), target_params=0.5, round_to=8, tolerance=0.001)
    assert loud.note == quiet.note
