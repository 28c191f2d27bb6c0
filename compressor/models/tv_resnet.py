"""torchvision ImageNet ResNet-18/34/50 (architecture only: weights are never
downloaded; import trained weights with ``compress import``)."""
from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model


def _build(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _register(arch: str):
    @register_model(arch, family="imagenet_resnet", input_size=(3, 224, 224),
                    description=f"torchvision {arch} (ImageNet layout, 224x224)")
    def build(num_classes=1000, in_chans=3):
        return _build(arch, num_classes, in_chans)

    return build


for _a in ("resnet18", "resnet34", "resnet50"):
    _register(_a)
