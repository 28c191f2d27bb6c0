"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2).

Three stages of n BasicBlocks at 16/32/64 channels. Layer names follow the
widely used CIFAR implementation (``conv1``, ``bn1``, ``layer1..3``,
``linear``) so that public CIFAR-10 checkpoints load key for key.

Shortcut options where the shape changes:
* ``"A"`` -- parameter-free: subsample by 2 and zero-pad the new channels
  (the original paper's CIFAR choice; the pretrained weights in shared data).
* ``"B"`` -- 1x1 convolution + BatchNorm (``shortcut.0`` / ``shortcut.1``),
  what the TAKD and DGKD code uses.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model

DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option A: stride-2 subsampling plus zero channels, no parameters."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.pool(x).flatten(1))


def _register(depth: int):
    @register_model(f"resnet{depth}", family="cifar_resnet",
                    description=f"CIFAR ResNet-{depth} (16/32/64 channels, BasicBlock)")
    def build(num_classes=10, in_chans=3, shortcut="A"):
        return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, shortcut=shortcut)

    return build


for _d in DEPTHS:
    _register(_d)
