import pytest
import torch
import torch_pruning as tp
from torch import nn

from convsim_shrink.errors import UnknownNameError
from convsim_shrink.models import create_model
from convsim_shrink.ranking import (
    ConvSimImportance,
    greedy_redundancy_order,
    list_criteria,
    make_importance,
    similarity_matrix,
)
from convsim_shrink.similarity import conv_similarity_reference


def test_every_required_criterion_is_selectable_by_name():
    assert set(list_criteria()) == {"convsim", "l1", "l2", "taylor", "fpgm", "lamp", "bn-scale", "random"}
    assert isinstance(make_importance("convsim"), ConvSimImportance)
    with pytest.raises(UnknownNameError, match="l1"):
        make_importance("l3")


def test_similarity_matrix_is_a_cosine_of_pairwise_cs():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    s = similarity_matrix(w)
    assert torch.allclose(s.diagonal(), torch.ones(4, dtype=torch.float64))
    # entry (0, 1) from the direct form on the pair
    pair = conv_similarity_reference(w[[0, 1]], normalized=True)
    self0 = conv_similarity_reference(torch.stack([w[0], w[0]]), normalized=True)
    self1 = conv_similarity_reference(torch.stack([w[1], w[1]]), normalized=True)
    assert s[0, 1].item() == pytest.approx((pair / (self0 * self1).sqrt()).item(), rel=1e-9)
    scaled = w.clone()
    scaled[2] = -5 * w[0]
    assert similarity_matrix(scaled)[0, 2].item() == pytest.approx(1.0)


def test_greedy_order_removes_one_of_a_duplicate_pair_first():
    sim = torch.tensor([[1.0, 0.2, 0.99, 0.1], [0.2, 1.0, 0.3, 0.25], [0.99, 0.3, 1.0, 0.2], [0.1, 0.25, 0.2, 1.0]])
    scores = greedy_redundancy_order(sim, tie_break=torch.tensor([1.0, 1.0, 2.0, 1.0]))
    assert scores.argmin().item() == 0  # of the near-duplicates 0 and 2, the smaller goes first
    assert scores[2] > scores[0]
    assert sorted(scores.tolist()) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def _group_for(model, layer):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 1, 28, 28))
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))


def test_convsim_ranks_an_exact_duplicate_channel_most_redundant():
    torch.manual_seed(1)
    model = create_model("simple_cnn", in_channels=1, width=0.5)
    conv = model.features[3]  # second conv
    with torch.no_grad():
        conv.weight[2] *= 10  # the largest filter: every magnitude criterion keeps it and its copy
        conv.weight[7] = conv.weight[2]  # channel 7 duplicates channel 2 exactly
    group = _group_for(model, conv)
    scores = ConvSimImportance()(group)
    assert scores.shape == (conv.out_channels,)
    assert scores.argmin().item() in (2, 7)
    assert scores[[2, 7]].max() > scores.median()  # only one of the pair goes early
    l2 = make_importance("l2")(group)
    assert l2.argmin().item() not in (2, 7)  # the test can tell similarity from magnitude


def test_convsim_scores_residual_groups_and_depthwise_models():
    torch.manual_seed(2)
    for name in ("resnet18", "mobilenet_v2"):
        model = create_model(name, in_channels=1, width=0.25).eval()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 1, 28, 28))
        n_groups = 0
        for group in dg.get_all_groups(root_module_types=[nn.Conv2d]):
            scores = ConvSimImportance()(group)
            assert scores is not None and torch.isfinite(scores).all()
            assert scores.shape == (len(group[0].idxs),)
            n_groups += 1
        assert n_groups > 3


@pytest.mark.parametrize("name", ["convsim", "l1", "l2", "taylor", "fpgm", "lamp", "bn-scale", "random"])
def test_every_criterion_scores_a_group(name):
    torch.manual_seed(3)
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    if name == "taylor":
        model(torch.randn(4, 1, 28, 28)).sum().backward()
    conv = model.features[3]
    scores = make_importance(name)(_group_for(model, conv))
    assert scores.shape == (conv.out_channels,) and torch.isfinite(scores).all()


def test_strength_zero_is_the_group_magnitude_order():
    torch.manual_seed(5)
    model = create_model("simple_cnn", in_channels=1, width=0.5)
    group = _group_for(model, model.features[3])
    ours = ConvSimImportance(strength=0.0)(group)
    l2 = tp.importance.GroupMagnitudeImportance(p=2)(group)
    assert torch.equal(ours.argsort(), l2.argsort())
