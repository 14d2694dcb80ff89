import pytest
import torch
from torch import nn

from convsim_shrink.errors import ConfigError, UnknownNameError
from convsim_shrink.models import SPEC_ATTR, classifier_of, create_model, list_models

REQUIRED = {"resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "vgg19_bn", "mobilenet_v2", "wide_resnet", "simple_cnn"}


def test_zoo_has_every_required_family():
    assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_every_model_runs_on_small_images(name, in_channels, size):
    width = 0.1 if name == "wide_resnet" else 0.25
    model = create_model(name, num_classes=7, in_channels=in_channels, width=width)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert classifier_of(model).out_features == 7
    assert getattr(model, SPEC_ATTR)["name"] == name


def test_width_scales_channels_and_params():
    small = create_model("resnet18", width=0.5)
    full = create_model("resnet18", width=1.0)
    assert small.conv1.out_channels == 32 and full.conv1.out_channels == 64
    assert full.fc.in_features == 512 and small.fc.in_features == 256
    ratio = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.2 < ratio < 0.3  # params grow with width squared


def test_small_input_stem():
    small = create_model("resnet18", small_input=True)
    big = create_model("resnet18", small_input=False)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    x = torch.randn(2, 3, 32, 32)
    small.eval(), big.eval()
    assert small.forward_features(x).shape[-1] == 4 and big.forward_features(x).shape[-1] == 1


def test_wide_resnet_is_wrn_28_10_by_default():
    model = create_model("wide_resnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 25  # stem + 4 blocks x 2 convs x 3 stages ... (28 layers incl. fc and shortcuts)
    assert model.fc.in_features == 640


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet19")
    msg = str(err.value)
    assert "resnet19" in msg and "resnet18" in msg and "vgg16_bn" in msg and "Did you mean" in msg


def test_none_kwargs_do_not_override_defaults_and_unknown_kwargs_fail():
    m = create_model("wide_resnet", depth=None, width=0.1)
    assert getattr(m, SPEC_ATTR)["kwargs"].get("depth") is None
    with pytest.raises(ConfigError, match="takes no argument"):
        create_model("resnet18", depth=3)
