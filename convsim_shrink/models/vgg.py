"""VGG with batch norm (torchvision's feature builder), channels scaled by ``width``."""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from ._base import Classifier
from ._registry import register_model, scale


class VGG(Classifier):
    """torchvision's VGG features; a global-average-pool + linear head (the usual small-image head).

    ``small_input``: max-pools round up (``ceil_mode``), so 28 px images survive the five pools.
    """

    classifier_attr = "classifier"

    def __init__(self, cfg_name, *, num_classes, in_channels, width, small_input):
        super().__init__()
        cfg = [v if v == "M" else scale(v, width) for v in cfgs[cfg_name]]
        self.features = make_layers(cfg, batch_norm=True)
        first = self.features[0]
        if in_channels != 3:
            self.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        if small_input:
            for i, m in enumerate(self.features):
                if isinstance(m, nn.MaxPool2d):
                    self.features[i] = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return self.features(x)


@register_model
def vgg11_bn(**kw) -> nn.Module:
    return VGG("A", **kw)


@register_model
def vgg16_bn(**kw) -> nn.Module:
    return VGG("D", **kw)


@register_model
def vgg19_bn(**kw) -> nn.Module:
    return VGG("E", **kw)
