"""The interface every zoo model shares (as in timm): features, head, classifier."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``forward = forward_head(forward_features(x))``; the head pools globally, flattens and applies
    the linear layer named by ``classifier_attr``."""

    classifier_attr = "fc"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_attr)
