import pytest
import torch

from convsim_shrink.cs.premin import preminimize
from convsim_shrink.cs.redundancy import feature_map_similarity, mean_similarity
from convsim_shrink.cs.similarity import conv_layers, model_conv_similarity
from convsim_shrink.data import build_data, sample_batch
from convsim_shrink.models import create_model
from convsim_shrink.recipe import DataConfig


def _norms(model):
    return {n: m.weight.detach().flatten(1).norm(dim=1).clone() for n, m in conv_layers(model)}


def test_premin_lowers_cs_and_keeps_every_filter_norm():
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, width=0.125)
    norms = _norms(model)
    bn_before = model.bn1.weight.detach().clone()
    result = preminimize(model, steps=60, lr=0.01)
    assert result.cs_after < 0.6 * result.cs_before
    with torch.no_grad():
        assert float(model_conv_similarity(model, normalized=True)) == pytest.approx(result.cs_after, rel=1e-4)
    for name, norm in _norms(model).items():
        assert torch.allclose(norm, norms[name], rtol=1e-5), name
    assert torch.equal(model.bn1.weight, bn_before)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_premin_zero_steps_changes_nothing():
    model = create_model("simple_cnn", width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = preminimize(model, steps=0)
    assert result.steps == 0 and result.cs_after == result.cs_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_premin_stops_early_when_stuck():
    model = create_model("simple_cnn", width=0.25)
    result = preminimize(model, steps=500, lr=1e-9, patience=5)
    assert result.steps < 20


def test_premin_lowers_feature_map_similarity_on_real_images(fashion_dir):
    """The paper's claim in miniature: lower CS, less similar feature maps on real images."""
    data = build_data(DataConfig(subset=100, test_subset=100), batch_size=50)
    images = sample_batch(data.test, 64)
    torch.manual_seed(1)
    model = create_model("resnet18", in_channels=1, width=0.25)
    before = mean_similarity(feature_map_similarity(model, images))
    preminimize(model, steps=100, lr=0.01)
    after = mean_similarity(feature_map_similarity(model, images))
    assert after < 0.8 * before


def test_feature_map_similarity_matches_a_slow_reference():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    model = torch.nn.Sequential(conv)
    x = torch.randn(4, 2, 6, 6)
    got = feature_map_similarity(model, x)["0"]
    out = conv(x).detach()
    sims, var = [], []
    for b in range(4):
        for i in range(3):
            for j in range(3):
                if i != j:
                    a, c = out[b, i].flatten(), out[b, j].flatten()
                    sims.append(abs(float(a @ c / (a.norm() * c.norm()))))
        var.append(float(out[b].var()))
    assert got["similarity"] == pytest.approx(sum(sims) / len(sims), rel=1e-5)
    assert got["std"] == pytest.approx((sum(var) / 4) ** 0.5, rel=1e-5)


def test_duplicate_channels_have_similarity_one():
    conv = torch.nn.Conv2d(1, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0] * 3
    got = feature_map_similarity(torch.nn.Sequential(conv), torch.randn(2, 1, 8, 8))
    assert got["0"]["similarity"] == pytest.approx(1.0, rel=1e-5)


def test_paper_mode_minimises_raw_adjacent_cs_and_shrinks_filters():
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    norms = _norms(model)
    with torch.no_grad():
        raw_before = float(model_conv_similarity(model, pairs="adjacent"))
    result = preminimize(model, steps=40, mode="paper", patience=40)
    assert result.cs_before == pytest.approx(raw_before, rel=1e-5)  # the objective is the raw adjacent CS
    assert result.cs_after < 0.8 * result.cs_before
    shrunk = [float(_norms(model)[n].mean() / norms[n].mean()) for n in norms]
    assert all(r < 1.0 for r in shrunk), shrunk  # no norm restoring: raw CS falls partly by shrinking


def test_shrink_only_control_copies_norms_and_keeps_directions():
    from convsim_shrink.cs.premin import filter_norms, rescale_filters

    torch.manual_seed(1)
    paper = create_model("simple_cnn", in_channels=1, width=0.25)
    control = create_model("simple_cnn", in_channels=1, width=0.25)
    control.load_state_dict(paper.state_dict())
    directions = {n: m.weight.detach().flatten(1) / m.weight.detach().flatten(1).norm(dim=1, keepdim=True) for n, m in conv_layers(control)}
    preminimize(paper, steps=30, mode="paper", patience=30)
    rescale_filters(control, filter_norms(paper))
    for name, norm in filter_norms(control).items():
        assert torch.allclose(norm, filter_norms(paper)[name], rtol=1e-5), name
    for name, m in conv_layers(control):
        w = m.weight.detach().flatten(1)
        assert torch.allclose(w / w.norm(dim=1, keepdim=True), directions[name], atol=1e-6), name
    with pytest.raises(ValueError, match="norms for"):
        rescale_filters(control, {next(iter(directions)): torch.ones(1)})


def test_premin_never_touches_frozen_weights():
    torch.manual_seed(2)
    model = create_model("resnet18", in_channels=1, width=0.125)
    model.conv1.weight.requires_grad_(False)
    model.bn1.weight.requires_grad_(False)
    frozen = model.conv1.weight.detach().clone()
    trainable_before = model.layer1[0].conv1.weight.detach().clone()
    for mode in ("norm-preserving", "paper"):
        preminimize(model, steps=10, mode=mode, patience=10)
        assert torch.equal(model.conv1.weight, frozen), mode
        assert not model.conv1.weight.requires_grad and not model.bn1.weight.requires_grad
    assert not torch.equal(model.layer1[0].conv1.weight, trainable_before)


def test_unknown_premin_mode_is_refused():
    with pytest.raises(ValueError, match="premin mode"):
        preminimize(create_model("simple_cnn", width=0.25), steps=1, mode="fast")
