"""Compensated pruning against slow, obviously correct references: statistics gathered by hand, least
squares by ``torch.linalg.lstsq`` on the raw rows, greedy residual ranking by brute-force regression."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from convsim_shrink.errors import ConfigError
from convsim_shrink.prune.compensation import (
    CompensationReport,
    Compensator,
    _Joint,
    collect_input_statistics,
    fold_into_consumer,
    kernel_output_covariance,
    least_squares,
    predict_input_statistics,
    refit_map,
    refit_to_dense,
)
from convsim_shrink.prune.ranking import ResidualImportance, get_criterion
from convsim_shrink.prune.search import prune_to_target


def _loader(x, batch=16):
    return [(x[i:i + batch], torch.zeros(len(x[i:i + batch]), dtype=torch.long)) for i in range(0, len(x), batch)]


def _rows(x):  # (N, C, H, W) -> (N·H·W, C)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _redundant_model(seed=0, padding=0):
    """conv(3→8) → BN → conv(8→6, no bias) → BN → ReLU → pool → linear; input channel 7 of the second conv is
    exactly 0.7·ch0 − 1.3·ch1 + const (conv1's filter 7 is that combination of filters 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=padding, bias=False), nn.BatchNorm2d(6),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in (m[1], m[3]):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        # BN1 is per channel affine, so make the *normalised* channel 7 the combination: scale conv1's filter and
        # bias so that BN1(conv1)_7 = 0.7·BN1(conv1)_0 − 1.3·BN1(conv1)_1 + 0.25
        s = m[1].weight / (m[1].running_var + m[1].eps).sqrt()
        w0, w1 = m[0].weight[0] * s[0], m[0].weight[1] * s[1]
        b0 = (m[0].bias[0] - m[1].running_mean[0]) * s[0] + m[1].bias[0]
        b1 = (m[0].bias[1] - m[1].running_mean[1]) * s[1] + m[1].bias[1]
        m[0].weight[7] = (0.7 * w0 - 1.3 * w1) / s[7]
        m[0].bias[7] = ((0.7 * b0 - 1.3 * b1 + 0.25) - m[1].bias[7]) / s[7] + m[1].running_mean[7]
    return m.eval()


def test_statistics_match_the_layers_inputs_gathered_by_hand():
    torch.manual_seed(0)
    m = _redundant_model()
    x = torch.randn(40, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    with torch.no_grad():
        inputs = {"0": x, "2": m[1](m[0](x)), "7": m[:7](x)}
    for name, inp in inputs.items():
        rows = (_rows(inp) if inp.dim() == 4 else inp).double()
        assert stats.count[name] == rows.shape[0]
        torch.testing.assert_close(stats.mean(name), rows.mean(0))
        centred = rows - rows.mean(0)
        torch.testing.assert_close(stats.covariance(name), centred.T @ centred / rows.shape[0])
    assert stats.batches == 3  # 40 images in batches of 16
    assert not m.training


def test_sampled_statistics_keep_whole_rows_and_are_reproducible():
    """max_rows samples rows (images x positions), never channels apart: an exact linear relation between
    channels holds on the sample, so the fit recovers it; the same data give the same statistics."""
    torch.manual_seed(0)
    m = _redundant_model()
    x = torch.randn(64, 3, 8, 8)  # 16 x 64 = 1024 rows a batch at layer "2"
    full = collect_input_statistics(m, _loader(x), batches=4, max_rows=None)
    sampled = collect_input_statistics(m, _loader(x), batches=4, max_rows=100)
    again = collect_input_statistics(m, _loader(x), batches=4, max_rows=100)
    assert full.count["2"] == 4 * 1024 and sampled.count["2"] == 4 * 100
    assert torch.equal(sampled.products["2"], again.products["2"]) and torch.equal(sampled.sums["2"], again.sums["2"])
    assert not torch.equal(sampled.products["2"], full.products["2"] * 100 / 1024)
    a, b = least_squares(sampled, "2", removed=[7], kept=[0, 1, 2, 3, 4, 5, 6], ridge=0.0)
    torch.testing.assert_close(a[:2, 0], torch.tensor([0.7, -1.3], dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(float(a[2:, 0].abs().max())) < 1e-6 and abs(float(b[0]) - 0.25) < 1e-5
    # a sample's moments estimate the full ones (400 rows of 8 channels)
    torch.testing.assert_close(sampled.covariance("2"), full.covariance("2"), atol=0.25 * float(full.covariance("2").diagonal().max()), rtol=0)
    assert sampled.count["7"] == full.count["7"] == 64  # the linear layer's rows (one per image) are under the cap
    with pytest.raises(ConfigError, match="max_rows"):
        collect_input_statistics(m, _loader(x), batches=1, max_rows=0)


def test_statistics_stop_after_the_asked_batches_and_skip_grouped_convs():
    m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 2, 1))
    x = torch.randn(48, 4, 5, 5)
    stats = collect_input_statistics(m, _loader(x), batches=2)
    assert stats.count["0"] == 32 * 25
    assert "1" not in stats and "depthwise" in stats.skipped["1"]
    assert "2" in stats


def test_least_squares_is_the_lstsq_optimum_on_the_raw_rows():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 5, 1))
    x = torch.randn(30, 3, 7, 7)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    removed, kept = [2, 5, 7], [0, 1, 3, 4, 6, 8, 9]
    a, b = least_squares(stats, "2", removed, kept, ridge=0.0)
    with torch.no_grad():
        rows = _rows(m[1](m[0](x))).double()
    design = torch.cat([rows[:, kept], torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, rows[:, removed]).solution
    torch.testing.assert_close(a, ref[:-1], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(b, ref[-1], atol=1e-8, rtol=1e-6)
    # the ridge shrinks the coefficients
    a_ridge, _ = least_squares(stats, "2", removed, kept, ridge=0.5)
    assert a_ridge.norm() < a.norm()


def test_the_compensated_layer_is_the_least_squares_optimal_layer():
    """For a 1×1 conv the compensated weights and bias are the layer that best reproduces the dense layer's
    output from the kept channels alone: lstsq of the outputs on [x_K, 1]."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 9, 3), nn.ReLU(), nn.Conv2d(9, 4, 1))
    x = torch.randn(25, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    with torch.no_grad():
        rows = _rows(m[1](m[0](x))).double()
        y = _rows(m(x)).double()
    removed, kept = [1, 4, 8], [0, 2, 3, 5, 6, 7]
    layer = copy.deepcopy(m[2])
    a, b = least_squares(stats, "2", removed, kept, ridge=0.0)
    fold_into_consumer(layer, removed, kept, a, b)
    design = torch.cat([rows[:, kept], torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, y).solution  # (|K| + 1, out)
    torch.testing.assert_close(layer.weight[:, kept, 0, 0].double(), ref[:-1].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.double(), ref[-1], atol=1e-5, rtol=1e-5)


def _prune_one(model, stats, channel, compensate):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 6, 6))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, [channel])
    comp = None
    if compensate:
        comp = Compensator(stats, ridge=0.0)
        comp.bind(model)
        comp.before_prune(group, dg)
    group.prune()
    return comp


@pytest.mark.parametrize("padding", [0, 1])
def test_a_channel_that_kept_channels_reproduce_is_removed_without_loss(padding):
    torch.manual_seed(3)
    dense = _redundant_model(padding=padding)
    x = torch.randn(64, 3, 6, 6)
    stats = collect_input_statistics(dense, _loader(x), batches=10)
    with torch.no_grad():
        want = dense(x)
    dropped, compensated = copy.deepcopy(dense), copy.deepcopy(dense)
    _prune_one(dropped, stats, 7, compensate=False)
    comp = _prune_one(compensated, stats, 7, compensate=True)
    assert compensated[2].in_channels == 7 and comp.report.compensated == ["2"]
    with torch.no_grad():
        err_dropped = (dropped(x) - want).abs().max().item()
        err = (compensated(x) - want).abs().max().item()
    assert err_dropped > 0.05
    if padding == 0:
        assert err < 1e-4  # float precision: the constant went into the following batch norm's mean
    else:
        assert err < 0.2 * err_dropped  # zero padding: the constant is off at the border positions only


def test_several_groups_compose_to_the_joint_fit():
    """Pruning two parts of one layer's input one after the other equals fitting them together (the fits are
    projections onto shrinking kept sets)."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 4, 1))
    x = torch.randn(30, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    seq = copy.deepcopy(m)
    dg = tp.DependencyGraph().build_dependency(seq, example_inputs=x[:1])
    comp = Compensator(stats, ridge=0.0)
    comp.bind(seq)
    for idxs in ([2, 6], [0, 4]):  # positions of the current model: [0, 4] are the original 0 and 5 after [2, 6] went
        group = dg.get_pruning_group(seq[0], tp.prune_conv_out_channels, idxs)
        comp.before_prune(group, dg)
        group.prune()
    joint = copy.deepcopy(m[2])
    removed = [0, 2, 5, 6]
    kept = [i for i in range(10) if i not in removed]
    a, b = least_squares(stats, "2", removed, kept, ridge=0.0)
    fold_into_consumer(joint, removed, kept, a, b)
    torch.testing.assert_close(seq[2].weight, joint.weight[:, kept], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seq[2].bias, joint.bias, atol=1e-5, rtol=1e-4)


def test_a_depthwise_consumer_is_left_alone_and_reported():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    x = torch.randn(20, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=5)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    group = dg.get_pruning_group(m[0], tp.prune_conv_out_channels, [1, 3])
    comp = Compensator(stats)
    comp.bind(m)
    before = m[3].weight.detach().clone()
    comp.before_prune(group, dg)
    # the depthwise conv loses its own filters 1 and 3 with its inputs: nothing to fold; the 1×1 conv after it
    # reads the depthwise outputs, which this group removes too, and is compensated on its own input
    assert "2" in comp.report.left_alone and comp.report.compensated == ["3"]
    assert not torch.equal(before, m[3].weight)


def _greedy_reference(x_rows, w_norms, removals):
    """Brute force: each step removes the channel whose regression residual variance on the other kept channels,
    times its weight norm, is smallest."""
    kept = list(range(x_rows.shape[1]))
    order = []
    for _ in range(removals):
        costs = {}
        for p in kept:
            others = [k for k in kept if k != p]
            design = torch.cat([x_rows[:, others], torch.ones(len(x_rows), 1, dtype=torch.float64)], 1)
            fit = torch.linalg.lstsq(design, x_rows[:, p:p + 1]).solution
            resid = x_rows[:, p:p + 1] - design @ fit
            costs[p] = float(w_norms[p] * resid.square().mean())
        p = min(costs, key=costs.get)
        order.append(p)
        kept.remove(p)
    return order


def test_residual_criterion_removes_channels_in_the_brute_force_greedy_order():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 7, 3), nn.ReLU(), nn.Conv2d(7, 5, 3))
    with torch.no_grad():
        m[0].weight[6] = 0.5 * m[0].weight[0] + 0.01 * m[0].weight[6]  # a near-duplicate
    x = torch.randn(40, 3, 8, 8)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    imp = ResidualImportance(ridge=0.0)
    imp.statistics = stats
    imp.bind(m)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    group = dg.get_pruning_group(m[0], tp.prune_conv_out_channels, list(range(7)))
    scores = imp(group)
    with torch.no_grad():
        rows = _rows(m[1](m[0](x))).double()
    w_norms = m[2].weight.detach().double().square().sum((0, 2, 3))
    ref = _greedy_reference(rows, w_norms, 6)
    assert scores.argsort()[:6].tolist() == ref
    assert ref[0] in (0, 6)  # one of the near-duplicates goes first


def test_residual_criterion_is_registered_and_needs_statistics():
    c = get_criterion("residual")
    assert c.needs_statistics and c.global_ranking and not c.needs_gradients
    imp = c.create()
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="statistics"):
        imp(dg.get_pruning_group(m[0], tp.prune_conv_out_channels, [0, 1, 2, 3]))


def _duplicated_resnet_like(seed=0):
    """Two residual blocks whose stream has 16 channels, 8 of which are exact copies of the other 8 (every
    producer of the stream writes its filters twice), so half the stream is redundant by construction."""
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return (x + self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.b1, self.b2 = Block(16), Block(16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = self.b2(self.b1(self.bn(self.stem(x)).relu()))
            return self.fc(x.mean((2, 3)))

    net = Net().eval()
    with torch.no_grad():
        for conv, bn in ((net.stem, net.bn), (net.b1.conv2, net.b1.bn2), (net.b2.conv2, net.b2.bn2)):
            conv.weight[8:] = conv.weight[:8]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[8:] = t[:8]
    return net


def test_prune_to_target_with_compensation_keeps_a_redundant_model_exact():
    net = _duplicated_resnet_like()
    x = torch.randn(48, 3, 8, 8)
    stats = collect_input_statistics(net, _loader(x), batches=10)

    class CopiesFirst(tp.importance.Importance):  # scores the stream's second half lowest
        def __call__(self, group):
            n = len(group[0].idxs)
            return torch.arange(n, 0, -1, dtype=torch.float32) if n == 16 else torch.arange(1, n + 1, dtype=torch.float32)

    kwargs = {"target_params": 0.7, "global_pruning": False, "round_to": 8, "ignored_layers": [net.b1.conv1, net.b2.conv1],
              "warn": False}
    plain = prune_to_target(net, x[:1], CopiesFirst(), **kwargs)
    comp = prune_to_target(net, x[:1], CopiesFirst(), compensator=Compensator(stats, ridge=0.0), **kwargs)
    assert net.stem.out_channels == 16  # the model given is left as it was
    assert comp.model.stem.out_channels == 8 and plain.model.stem.out_channels == 8
    assert comp.uncompensated is not None and comp.compensation.compensated
    with torch.no_grad():
        want = net(x)
        err_plain = (plain.model(x) - want).abs().max().item()
        err = (comp.model(x) - want).abs().max().item()
    assert err_plain > 0.1
    assert err < 1e-3
    assert comp.params_ratio == plain.params_ratio


def test_a_linear_layer_after_flatten_is_compensated_feature_by_feature():
    """A linear layer reading a flattened C×H×W map loses H·W features per removed channel; each is refitted
    from the kept features, so a channel that kept channels reproduce is removed without loss."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    with torch.no_grad():
        m[0].weight[3] = 2.0 * m[0].weight[0] - m[0].weight[2]
        m[0].bias[3] = 2.0 * m[0].bias[0] - m[0].bias[2] + 0.5
    x = torch.randn(80, 3, 5, 5)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    assert stats.count["2"] == 80 and stats.sums["2"].shape == (36,)
    with torch.no_grad():
        want = m(x)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    group = dg.get_pruning_group(m[0], tp.prune_conv_out_channels, [3])
    comp = Compensator(stats, ridge=0.0)
    comp.bind(m)
    comp.before_prune(group, dg)
    group.prune()
    assert m[2].in_features == 27 and comp.report.compensated == ["2"]
    with torch.no_grad():
        assert (m(x) - want).abs().max().item() < 1e-3


# --- data-free statistics (prune.compensation_data=kernels) -----------------------------------------------------


def _smooth_field(n, c, size, rho, g):
    """Zero-mean unit-variance fields whose spatial autocorrelation is ρ^{|Δy|+|Δx|} (separable AR(1) in each
    direction, started from the stationary distribution), float64 ``(n, c, size, size)``."""
    x = torch.randn(n, c, size, size, dtype=torch.float64, generator=g)
    s = (1 - rho ** 2) ** 0.5
    for dim in (2, 3):
        y = x.clone()
        for i in range(1, size):
            y.select(dim, i).copy_(rho * y.select(dim, i - 1) + s * x.select(dim, i))
        x = y
    return x


@pytest.mark.parametrize("rho,groups", [(0.0, 1), (0.6, 1), (0.6, 2)])
def test_kernel_covariance_is_the_covariance_of_the_conv_on_inputs_with_that_autocorrelation(rho, groups):
    g = torch.Generator().manual_seed(1)
    x = _smooth_field(48, 4, 36, rho, g)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=g)
    rows = _rows(nn.functional.conv2d(x, w, groups=groups))
    empirical = torch.cov(rows.T)
    predicted = kernel_output_covariance(w, groups, rho)
    scale = predicted.diagonal().max()
    assert (empirical - predicted).abs().max() < 0.03 * scale
    if groups > 1:  # filters of different groups read different channels: uncorrelated, exactly
        assert predicted[:3, 3:].abs().max() == 0


def test_predicted_statistics_are_those_of_the_relu_after_a_normalised_conv():
    """conv → BN → ReLU → conv on white-noise images: the BN output is Gaussian with the kernels' correlation,
    scaled by γ and shifted by β; the second conv's input moments, predicted with no data, must match the
    moments measured on such images."""
    g = torch.Generator().manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 1)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g))
        m[1].weight.copy_(torch.rand(5, dtype=torch.float64, generator=g) + 0.5)
        m[1].bias.copy_(torch.randn(5, dtype=torch.float64, generator=g) * 0.5)
        m[1].running_mean.zero_()
        m[1].running_var.copy_(kernel_output_covariance(m[0].weight, 1, 0.0).diagonal() - m[1].eps)
    m.eval()
    x = torch.randn(256, 3, 10, 10, dtype=torch.float64, generator=g)
    stats = predict_input_statistics(m.float(), torch.randn(1, 3, 10, 10), autocorrelation=0.0, samples=200_000)
    m.double()
    with torch.no_grad():
        rows = _rows(m[2](m[1](m[0](x))))
    mean, cov = rows.mean(0), torch.cov(rows.T, correction=0)
    assert (stats.mean("3") - mean).abs().max() < 0.03 * mean.abs().max()
    assert (stats.covariance("3") - cov).abs().max() < 0.04 * cov.diagonal().max()
    assert "0" not in stats.count or stats.mean("0").abs().max() < 0.05  # the image: no batch norm behind it


def test_data_free_compensation_recovers_a_redundant_filter():
    """conv1's filter 7 is 0.7·filter 0 − 1.3·filter 1 (no bias), its batch norm calibrated on the input the
    test feeds (white noise): the kernels alone show that BN output 7 is an affine combination of outputs 0
    and 1, so the data-free compensation removes channel 7 with (almost) no change to the model's output (the
    consumer has no padding, where the constant would be off at the border),
    where dropping it changes the output a lot."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        m[0].weight[7] = 0.7 * m[0].weight[0] - 1.3 * m[0].weight[1]
        m[1].running_mean.zero_()
        m[1].running_var.copy_(kernel_output_covariance(m[0].weight, 1, 0.0).diagonal().float() - m[1].eps)
    m.eval()
    x = torch.randn(64, 3, 8, 8, generator=g)
    with torch.no_grad():
        dense = m(x)
    stats = predict_input_statistics(m, x[:1], autocorrelation=0.0)

    def prune(compensator):
        model = copy.deepcopy(m)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
        group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[7])
        if compensator is not None:
            compensator.bind(model)
            compensator.before_prune(group, graph)
        group.prune()
        with torch.no_grad():
            return (model(x) - dense).pow(2).mean().item()

    dropped, compensated = prune(None), prune(Compensator(stats, ridge=1e-9))
    assert dropped > 1e-3
    assert compensated < 1e-4 * dropped


# ----------------------------------------------------------------------------- refitting to the dense model


def _chain(seed=7):
    """conv(3→10) → ReLU → conv(10→8, 1×1) → ReLU → conv(8→5, 1×1): the first conv's outputs are pruned, the
    second conv reads them (compensated), the third reads an input that pruning upstream changed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()


def _prune_first_conv(model, stats, channels):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 6, 6))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, channels)
    comp = Compensator(stats, ridge=0.0)
    comp.bind(model)
    comp.before_prune(group, dg)
    group.prune()
    return comp.report


def test_refit_map_is_the_ridge_to_identity_least_squares_on_the_raw_rows():
    g = torch.Generator().manual_seed(8)
    xp = torch.randn(500, 4, generator=g, dtype=torch.float64) + 0.3
    mix = torch.randn(4, 6, generator=g, dtype=torch.float64)
    xd = xp @ mix + 0.1 * torch.randn(500, 6, generator=g, dtype=torch.float64) + 1.0
    kept, ridge = [5, 0, 2, 3], 0.05
    joint = _Joint(4, 6)
    for i in range(0, 500, 100):
        joint.add(xp[i:i + 100], xd[i:i + 100])
    b, d = refit_map(joint, kept, ridge)
    # reference: minimise (1/n)‖Xd − X̃ B − 1 dᵀ‖² + λ‖B − E‖² as one stacked least-squares problem
    n = len(xp)
    xc, yc = xp - xp.mean(0), xd - xd.mean(0)
    lam = ridge * float(xc.var(0, unbiased=False).mean())
    embed = torch.zeros(4, 6, dtype=torch.float64)
    embed[torch.arange(4), torch.tensor(kept)] = 1.0
    design = torch.cat([xc / n ** 0.5, lam ** 0.5 * torch.eye(4, dtype=torch.float64)])
    target = torch.cat([yc / n ** 0.5, lam ** 0.5 * embed])
    ref = torch.linalg.lstsq(design, target).solution
    torch.testing.assert_close(b, ref, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(d, xd.mean(0) - ref.T @ xp.mean(0), atol=1e-8, rtol=1e-8)


def test_refit_leaves_a_layer_whose_input_did_not_change_as_it_was():
    m = _chain()
    x = torch.randn(40, 3, 6, 6)
    pruned = copy.deepcopy(m)
    report = CompensationReport()  # nothing pruned
    done = refit_to_dense(pruned, m, report, _loader(x), batches=3, ridge=1e-3)
    assert done == ["0", "2", "4"]
    for a, b in zip(m.parameters(), pruned.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_refitted_last_layer_is_the_least_squares_layer_on_the_pruned_models_inputs():
    """With upstream pruned, the refitted 1×1 output layer is the layer that best reproduces the dense model's
    output from the pruned model's own input: lstsq of the dense outputs on [x̃, 1] (ridge 0)."""
    m = _chain()
    x = torch.randn(60, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    pruned = copy.deepcopy(m)
    report = _prune_first_conv(pruned, stats, [1, 4, 7])
    assert report.kept_outputs["0"] == [0, 2, 3, 5, 6, 8, 9] and report.kept_inputs["2"] == [0, 2, 3, 5, 6, 8, 9]
    with torch.no_grad():
        before = (pruned(x) - m(x)).pow(2).mean().item()
    refit_to_dense(pruned, m, report, _loader(x), batches=10, ridge=0.0, max_rows=None)
    with torch.no_grad():
        xin = _rows(pruned[3](pruned[2](pruned[1](pruned[0](x))))).double()
        want = _rows(m(x)).double()
        after = (pruned(x) - m(x)).pow(2).mean().item()
    design = torch.cat([xin, torch.ones(len(xin), 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, want).solution
    torch.testing.assert_close(pruned[4].weight[:, :, 0, 0].double(), ref[:-1].T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned[4].bias.double(), ref[-1], atol=1e-4, rtol=1e-4)
    assert after < before  # least squares on these very rows: the refit cannot be worse than the compensation
    assert report.refitted == ["0", "2", "4"]


def test_refit_keeps_a_redundant_model_exact_and_moves_constants_into_the_dense_norm():
    torch.manual_seed(3)
    dense = _redundant_model()
    x = torch.randn(64, 3, 6, 6)
    stats = collect_input_statistics(dense, _loader(x), batches=10)
    pruned = copy.deepcopy(dense)
    comp = _prune_one(pruned, stats, 7, compensate=True)
    refit_to_dense(pruned, dense, comp.report, _loader(x), batches=10, ridge=0.0)
    assert comp.report.refitted == ["0", "2", "7"]
    with torch.no_grad():
        err = (pruned(x) - dense(x)).abs().max().item()
    assert err < 1e-3


def test_refit_needs_a_batch():
    m = _chain()
    with pytest.raises(ConfigError, match="compensation_refit=0"):
        refit_to_dense(copy.deepcopy(m), m, CompensationReport(), [], batches=2)


def test_refit_with_the_dense_inputs_kept_equals_measuring_them_layer_by_layer():
    m = _chain()
    x = torch.randn(60, 3, 6, 6)
    stats = collect_input_statistics(m, _loader(x), batches=10)
    pruned = copy.deepcopy(m)
    report = _prune_first_conv(pruned, stats, [1, 4, 7])
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    refit_to_dense(a, m, copy.deepcopy(report), _loader(x), batches=4, max_rows=50)  # every dense input kept
    refit_to_dense(b, m, copy.deepcopy(report), _loader(x), batches=4, max_rows=50, cache_bytes=0)  # none kept
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[4].weight, pruned[4].weight)
