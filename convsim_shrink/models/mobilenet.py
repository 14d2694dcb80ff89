"""MobileNetV2 (torchvision), with ``width`` as its width multiplier and a small-image stem."""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2

from ._registry import register_model


class _MobileNetV2(MobileNetV2):
    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]


@register_model
def mobilenet_v2(*, num_classes, in_channels, width, small_input, dropout: float = 0.2) -> nn.Module:
    """``small_input``: stride 1 in the stem and in the second stage (the usual CIFAR variant), so a
    28-32 px image is downsampled 8x instead of 32x."""
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    if small_input:
        setting[1][3] = 1
    model = _MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting, dropout=dropout)
    stem = model.features[0][0]
    stride = 1 if small_input else 2
    if in_channels != 3 or small_input:
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model
