"""Users' own architectures for the "bring your own nn.Module" path (test helpers, not patchcsra code).

``resnet20``/``resnet56``: the CIFAR ResNets of ../shared/weights/MANIFEST.md section 1 (option-A
shortcuts, ``F.avg_pool2d`` with a kernel equal to the map size -- not an AdaptiveAvgPool2d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LambdaShortcut(nn.Module):
    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _LambdaShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(9, num_classes)


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
