"""Pruning-aware (group sparse) training: torch-pruning's group-norm regulariser, wired into the one
training loop (``train.sparsity``)."""

import pytest
import torch
from torch import nn

from convsim_shrink.data import INFO
from convsim_shrink.errors import ConfigError
from convsim_shrink.pipeline.stages import build_stage, prepare_data, train_stage
from convsim_shrink.prune.pruning import group_sparsity_regularizer
from convsim_shrink.recipe import ModelConfig, TrainConfig, resolve

X = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _graded(net: Net, scales: torch.Tensor) -> Net:
    """conv1's channel c (its filter, BN weight and conv2's input slice) scaled by scales[c]: the group
    norms are ordered as ``scales`` is."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # positive, so no channel is near zero by chance
        net.conv1.weight.mul_(scales.view(-1, 1, 1, 1))
        net.bn1.weight.mul_(scales)
        net.conv2.weight.mul_(scales.view(1, -1, 1, 1))
    return net


def _zero_grads(net):
    for p in net.parameters():
        p.grad = torch.zeros_like(p)


def test_each_channel_decays_between_1x_and_16x_the_coefficient_weakest_most():
    scales = torch.tensor([3.0, 0.2, 1.0, 5.0, 0.6, 2.0])
    net = _graded(Net(), scales)
    reg = group_sparsity_regularizer(net, X, 1e-3)
    _zero_grads(net)
    reg()
    # the gradient each weight gains is coefficient * gamma * weight, one gamma per channel of the group
    gamma = net.conv1.weight.grad / (1e-3 * net.conv1.weight.detach())
    per_channel = gamma.flatten(1)
    assert torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), rtol=1e-4)
    gamma = per_channel[:, 0]
    assert gamma.min() == pytest.approx(1.0, rel=1e-4) and gamma.max() == pytest.approx(16.0, rel=1e-4)
    assert int(gamma.argmax()) == int(scales.argmin()) and int(gamma.argmin()) == int(scales.argmax())
    assert torch.equal(torch.argsort(gamma), torch.argsort(scales, descending=True))  # weaker channel, more decay
    # the same gammas on the group's BN weights and on the next conv's input channels; conv2's weights also
    # belong to conv2's own group (its filters), so there the two decays add up
    assert torch.allclose(net.bn1.weight.grad / (1e-3 * net.bn1.weight.detach()), gamma, rtol=1e-4)
    both = (net.conv2.weight.grad / (1e-3 * net.conv2.weight.detach()))[:, :, 0, 0]
    own = both - gamma.view(1, -1)  # conv2's gamma per filter, the same for every input channel
    assert torch.allclose(own, own[:, :1].expand_as(own), rtol=1e-3)
    assert own.min() == pytest.approx(1.0, rel=1e-3) and own.max() == pytest.approx(16.0, rel=1e-3)
    # the classifier's outputs are never a group: its bias gets nothing; its weight only as conv2's consumer
    assert torch.count_nonzero(net.fc.bias.grad) == 0
    fc_gamma = net.fc.weight.grad / (1e-3 * net.fc.weight.detach())
    assert torch.allclose(fc_gamma, fc_gamma[:1].expand_as(fc_gamma), rtol=1e-4)  # per input channel, as conv2's group


def test_a_group_whose_channels_score_alike_is_skipped_not_turned_into_nan():
    net = _graded(Net(), torch.tensor([3.0, 0.2, 1.0, 5.0, 0.6, 2.0]))
    with torch.no_grad():  # conv2's channels identical in every tensor of their group
        net.conv2.weight.copy_(net.conv2.weight[:1].expand_as(net.conv2.weight))
        net.bn2.weight.fill_(1.0)
        net.fc.weight.copy_(net.fc.weight[:, :1].expand_as(net.fc.weight))
    reg = group_sparsity_regularizer(net, X, 1e-3)
    _zero_grads(net)
    reg()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert torch.count_nonzero(net.bn2.weight.grad) == 0  # the equal group is left alone...
    assert torch.count_nonzero(net.bn1.weight.grad) == 6  # ...the others are not


def test_building_the_regulariser_leaves_batch_norm_statistics_and_mode_alone():
    net = Net().train()
    before = net.bn1.running_mean.clone(), int(net.bn1.num_batches_tracked)
    group_sparsity_regularizer(net, X, 1e-3)
    assert net.training and torch.equal(net.bn1.running_mean, before[0]) and int(net.bn1.num_batches_tracked) == before[1]
    with pytest.raises(ConfigError, match="positive"):
        group_sparsity_regularizer(net, X, 0.0)


@pytest.fixture(scope="module")
def data(fashion_dir):
    return prepare_data(resolve(None, sets=["data.subset=320", "data.val_split=100", "data.test_subset=200", "train.batch_size=64"]))


def _trained(data, sparsity):
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = build_stage(ModelConfig(name="simple_cnn", width=0.25), INFO["fashion-mnist"], seed=0, example_inputs=x).model
    torch.manual_seed(0)
    out = train_stage(model, data, TrainConfig(epochs=2, lr=0.05, precision="fp32", sparsity=sparsity))
    return model, out, torch.get_rng_state()


def test_sparse_training_spreads_the_channels_apart_and_leaves_the_random_stream_alone(data):
    plain, plain_out, plain_rng = _trained(data, 0.0)
    sparse, sparse_out, sparse_rng = _trained(data, 0.05)
    assert sparse_out.history[-1]["train_loss"] < sparse_out.history[0]["train_loss"]  # it still learns
    # the batch-norm scales of the channels pruning would remove (the weakest) end much smaller, relative to
    # the layer's strongest, than without the regulariser
    def spread(model):
        return min(float(m.weight.detach().abs().min() / m.weight.detach().abs().max()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert spread(sparse) < 0.5 * spread(plain)
    # setting it up (an example input, the pruneability trials) drew nothing from the global generator:
    # a run with the regulariser draws exactly what the same run without it draws
    assert torch.equal(sparse_rng, plain_rng)


# ------------------------------------------------------------------ the vectorised form against the library's loop


class Mixed(nn.Module):
    """The shapes the flat form must follow or hand back to the library: a residual add, a concat, a
    depthwise and a grouped conv, a flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.dw, self.bndw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False), nn.BatchNorm2d(14)
        self.pw = nn.Conv2d(14, 8, 1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 12), nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + torch.relu(self.bna(self.a(x)))  # residual: stem, a and their BNs share one group
        x = torch.cat([x, self.b(x)], 1)  # concat: two groups feed one tensor
        x = self.pw(torch.relu(self.bndw(self.dw(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # flatten: fc1's inputs come 16 per channel
        return self.fc2(torch.relu(self.fc1(x)))


def _randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # signed, spread magnitudes, so every group's gammas differ
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 + 2 * torch.rand(p.shape, generator=g)))
    return model


def _grads_after(model, regularize, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # a gradient already there: the regulariser adds to it
        p.grad = torch.randn(p.shape, generator=g).contiguous(memory_format=torch.channels_last) if p.dim() == 4 else torch.randn(p.shape, generator=g)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    regularize()
    return {n: p.grad - before[n] for n, p in model.named_parameters()}


def _assert_same_gradient(model, x, **kwargs):
    slow = group_sparsity_regularizer(model, x, 1e-3, vectorised=False, **kwargs)
    fast = group_sparsity_regularizer(model, x, 1e-3, **kwargs)
    want, got = _grads_after(model, slow, 1), _grads_after(model, fast, 1)
    touched = 0
    for name in want:
        scale = float(want[name].abs().max()) + 1e-12
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5 * scale), name
        touched += int(torch.count_nonzero(want[name]))
    assert touched > 0  # the reference did regularise something
    return fast.__self__


def test_the_vectorised_regulariser_gives_the_librarys_gradient_on_a_resnet():
    from convsim_shrink.models import create_model

    torch.manual_seed(0)
    model = _randomised(create_model("resnet18", num_classes=10, in_channels=1, width=0.125, small_input=True), 3)
    reg = _assert_same_gradient(model, torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert reg.n_groups > 0 and not reg.fallback_groups  # every group took the vectorised path
    model.to(memory_format=torch.channels_last)  # as training runs on the CPU: the layers are followed
    _assert_same_gradient(model, torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)))


def test_the_vectorised_regulariser_gives_the_librarys_gradient_on_concat_flatten_and_depthwise_convs():
    model = _randomised(Mixed(), 4)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reg = _assert_same_gradient(model, x)
    assert reg.n_groups > 0 and reg.fallback_groups  # both paths ran: flat groups and the library's own
    _assert_same_gradient(model, x, ignored_layers=[model.a])


def test_the_vectorised_regulariser_skips_a_group_whose_channels_score_alike():
    net = _graded(Net(), torch.tensor([3.0, 0.2, 1.0, 5.0, 0.6, 2.0]))
    with torch.no_grad():
        net.conv2.weight.copy_(net.conv2.weight[:1].expand_as(net.conv2.weight))
        net.bn2.weight.fill_(1.0)
        net.fc.weight.copy_(net.fc.weight[:, :1].expand_as(net.fc.weight))
    reg = _assert_same_gradient(net, X)
    assert not reg.fallback_groups
    _zero_grads(net)
    reg.regularize()
    assert torch.count_nonzero(net.bn2.weight.grad) == 0 and torch.count_nonzero(net.bn1.weight.grad) == 6
