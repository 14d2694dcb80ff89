"""ResNets (torchvision's blocks, channels scaled by ``width``) and Wide ResNets (WRN-d-k, CIFAR style)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ._base import Classifier
from ._registry import register_model, scale


class ResNet(Classifier):
    """torchvision's ResNet layout with every stage's width multiplied by ``width``.

    ``small_input``: 3x3 stride-1 stem and no max-pool (28-64 px images); else the ImageNet stem.
    """

    def __init__(self, block, layers, *, num_classes, in_channels, width, small_input):
        super().__init__()
        planes = [scale(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0], 1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_model
def resnet18(**kw) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


@register_model
def resnet34(**kw) -> nn.Module:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


@register_model
def resnet50(**kw) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


class _WideBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (BN-ReLU-conv twice, optional dropout)."""

    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Classifier):
    """WRN-depth-k (Zagoruyko & Komodakis, 2016), the CIFAR layout used in the paper's experiments."""

    def __init__(self, *, depth, widen, num_classes, in_channels, width, small_input, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("wide_resnet depth must be 6n+4 (e.g. 16, 22, 28, 40)")
        n = (depth - 4) // 6
        chans = [scale(16, width)] + [scale(c * widen, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, 1 if small_input else 2, 1, bias=False)
        blocks = []
        cin = chans[0]
        for stage, cout in enumerate(chans[1:]):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, (1 if stage == 0 else 2) if i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return torch.relu(self.bn(self.blocks(self.conv1(x))))


@register_model
def wide_resnet(*, depth: int = 28, widen: int = 10, dropout: float = 0.0, **kw) -> nn.Module:
    """WRN-28-10 by default; ``depth``/``widen`` choose another member of the family."""
    return WideResNet(depth=depth, widen=widen, dropout=dropout, **kw)
