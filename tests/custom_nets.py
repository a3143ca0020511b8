"""Users' own architectures for the "bring your own nn.Module" path (test helpers, not patchcsra code).

``resnet20``/``resnet56`` are the CIFAR ResNets of ``benchmarks/cifar_resnet.py``; the nets below are
small cases the head discovery must handle or refuse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_resnet import CifarResNet, resnet20, resnet56  # noqa: F401  (benchmarks/, put on sys.path by conftest)


class MeanPoolNet(nn.Module):
    """A small net pooling with ``x.mean((2, 3))`` and a two-layer MLP head."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.GELU())
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return self.fc2(torch.tanh(self.fc1(x)))


class FlattenNet(nn.Module):
    """No global pooling: flattens the map into its classifier (must be refused)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, 4, 1)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


class SkipHeadNet(nn.Module):
    """Head reads an earlier activation besides the pooled one (must be refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.b = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return self.fc(F.adaptive_avg_pool2d(b, 1).flatten(1) + a.amax((2, 3)))
