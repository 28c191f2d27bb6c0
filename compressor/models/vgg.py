"""VGG-8/11/13/16/19 with BatchNorm for 32x32 input (the CIFAR variant used by
CRD/RepDistiller and the DGKD paper's VGG13 -> VGG8 setup).

Five stages of 3x3 conv + BN + ReLU; max-pool after the first four, global
average pool after the last, one linear classifier on 512 features.
"""
from __future__ import annotations

from torch import nn

from .registry import register_model

STAGES = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class CifarVGG(nn.Module):
    def __init__(self, stages, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i, stage in enumerate(stages):
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2) if i < len(stages) - 1 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _register(depth: int):
    @register_model(f"vgg{depth}", family="vgg", description=f"VGG-{depth} with BatchNorm, 32x32 input")
    def build(num_classes=10, in_chans=3):
        return CifarVGG(STAGES[depth], num_classes=num_classes, in_chans=in_chans)

    return build


for _d in STAGES:
    _register(_d)
