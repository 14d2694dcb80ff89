import pytest
import torch

from convsim_shrink.data import build_data, sample_batch
from convsim_shrink.models import create_model
from convsim_shrink.premin import preminimize
from convsim_shrink.recipe import DataConfig
from convsim_shrink.redundancy import feature_map_similarity, mean_similarity
from convsim_shrink.similarity import conv_layers, model_conv_similarity


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
