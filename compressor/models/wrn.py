"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) for 32x32 input.

Pre-activation blocks, widths 16k/32k/64k, (d-4)/6 blocks per stage, 1x1
convolution shortcuts where the width changes; no dropout (as in the
distillation literature's WRN-40-2 / WRN-16-2 setups).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model

VARIANTS = ((16, 1), (16, 2), (16, 4), (28, 2), (40, 1), (40, 2), (40, 4))


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        # The projection shortcut sees the pre-activated input, as in the reference code.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _register(depth: int, widen: int):
    @register_model(f"wrn{depth}_{widen}", family="wrn",
                    description=f"Wide ResNet-{depth}-{widen} for 32x32 input")
    def build(num_classes=10, in_chans=3):
        return WideResNet(depth, widen, num_classes=num_classes, in_chans=in_chans)

    return build


for _d, _k in VARIANTS:
    _register(_d, _k)
