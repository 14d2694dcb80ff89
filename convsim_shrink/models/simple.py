"""A small plain CNN for fast tests and quick experiments."""

from __future__ import annotations

from torch import nn

from ._base import Classifier
from ._registry import register_model, scale


class SimpleCNN(Classifier):
    """Four conv-BN-ReLU blocks (two max-pools) and a linear head; 32-64-128-128 channels at width 1."""

    def __init__(self, *, num_classes, in_channels, width, small_input):
        super().__init__()
        c = [scale(v, width) for v in (32, 64, 128, 128)]
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(c):
            stride = 2 if (i == 0 and not small_input) else 1
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i in (1, 2):
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.features(x)


@register_model
def simple_cnn(**kw) -> nn.Module:
    return SimpleCNN(**kw)
