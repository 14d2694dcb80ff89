"""Helpers several test files share: the tiny models torch-pruning fails on (issue 12) and image folders
written on the fly.  Test files import them as ``from helpers import ...`` (pytest puts ``tests/`` on the
path, as for ``conftest.py``)."""

from collections import namedtuple

import numpy as np
import torch
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual

# ------------------------------------------------------------------- the failing kinds of model (issue 12)


class TinyShuffle(nn.Module):
    """A stem conv and three ShuffleNet units (the smallest input that fails in torch-pruning)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(InvertedResidual(16, 32, 2), InvertedResidual(32, 32, 1), InvertedResidual(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class SplitCat(nn.Module):
    """YOLO-style: conv(c -> 2h), chunk in two, a conv on the second half, cat of all three, 1x1 conv."""

    def __init__(self, c=16, h=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.cv1 = nn.Conv2d(c, 2 * h, 1)
        self.m = nn.Conv2d(h, h, 3, padding=1)
        self.cv2 = nn.Conv2d(3 * h, c, 1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        return self.fc(self.cv2(torch.cat([a, b, self.m(b)], 1)).mean((2, 3)))


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.c2 = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.c2(self.ps(self.c1(x))).mean((2, 3)))


class ConvClassifier(nn.Module):
    """SqueezeNet's kind: the class scores come from a 1x1 conv, not a Linear layer (and no layer is
    called 'fc' or 'classifier')."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x):
        return torch.flatten(self.body(x), 1)


AuxOut = namedtuple("AuxOut", ["logits", "aux"])


class AuxHead(nn.Module):
    """GoogLeNet's kind: an auxiliary head that runs only in training mode, a named tuple out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = self.a(x)
        logits = self.fc(self.b(h).mean((2, 3)))
        return AuxOut(logits, self.aux(h)) if self.training else logits


class LogitsAndFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        feats = self.c2(torch.relu(self.c1(x))).mean((2, 3))
        return self.fc(feats), feats


class _CBR(nn.Sequential):
    def __init__(self, cin, cout, k=3, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TensorSplitResidual(nn.Module):
    """A ``tensor_split`` of a residual stream, one half convolved, concatenated back and added to the
    stream: torch-pruning's walk of the channel group through it never ends (its index mapping makes new
    indices on every pass round the cycle), so building that group runs until a limit stops it."""

    def __init__(self):
        super().__init__()
        self.stem, self.pre, self.branch = _CBR(3, 32), _CBR(32, 32), _CBR(16, 16)
        self.post, self.fc = _CBR(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.pre(self.stem(x))
        p, q = torch.tensor_split(h, 2, dim=1)
        return self.fc(self.post(torch.cat([self.branch(p), q], 1) + h).mean((2, 3)))


class ChannelAttention(nn.Module):
    """Issue 24's Restormer-style block in a small classifier: 1x1 conv -> depthwise conv -> chunk into q,
    k, v -> heads -> normalised q k^T -> softmax -> v -> 1x1 conv, plus the residual."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.stem, self.heads = nn.Conv2d(3, c, 3, padding=1), heads
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.dw = nn.Conv2d(3 * c, 3 * c, 3, padding=1, groups=3 * c)
        self.proj = nn.Conv2d(c, c, 1)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.post, self.fc = nn.Conv2d(c, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        b, c, h, w = x.shape
        q, k, v = self.dw(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(-1)
        x = self.proj((attn @ v).reshape(b, c, h, w)) + x
        return self.fc(torch.relu(self.post(x)).mean((2, 3)))


KINDS = [
    (TinyShuffle, "reshape", "fc"),
    (SplitCat, "split-cat", "fc"),
    (PixelShuffleNet, "pixel-shuffle", "fc"),
    (ConvClassifier, None, "body.6"),
    (AuxHead, "train-only", "fc"),
]


# ------------------------------------------------------------------------------------- image folders


def image_folder(root, layout, *, size=(12, 16), seed=0):
    """``layout``: {split: {class: number of images}}; PNG and JPEG files alternate."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
                img.save(d / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    return root


def truncate(path):
    """Cut a file to half its bytes (an unreadable image)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
