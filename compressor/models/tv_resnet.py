"""torchvision ImageNet ResNets (architecture only: weights are never
downloaded; import trained weights with ``compress import``).

torchvision's 18/34/50/101 plus basic-block depths in between, built with
torchvision's own ``ResNet`` class, so that a ResNet-34 -> ResNet-18 chain
has real assistants. Depth = 2 + 2 x (blocks per stage summed) for basic
blocks; the names avoid the CIFAR ResNet depths (6n+2: 8, 14, 20, 26, ...):

=========  ============  ==================
name       blocks        block
=========  ============  ==================
resnet10   1, 1, 1, 1    BasicBlock
resnet18   2, 2, 2, 2    BasicBlock (torchvision)
resnet22   2, 3, 3, 2    BasicBlock
resnet28   3, 3, 4, 3    BasicBlock
resnet34   3, 4, 6, 3    BasicBlock (torchvision)
resnet50   3, 4, 6, 3    Bottleneck (torchvision)
resnet101  3, 4, 23, 3   Bottleneck (torchvision)
=========  ============  ==================

``stem="cifar"`` (see :mod:`.stems`): 3x3 stride-1 ``conv1``, no max-pool.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .registry import register_model
from .stems import adapt_stem

LAYOUTS = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    22: (BasicBlock, (2, 3, 3, 2)),
    28: (BasicBlock, (3, 3, 4, 3)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def build_resnet(depth: int, num_classes: int = 1000, in_chans: int = 3, stem: str = "imagenet") -> nn.Module:
    block, layers = LAYOUTS[depth]
    model = ResNet(block, list(layers), num_classes=num_classes)
    return adapt_stem(model, model, "conv1", in_chans, stem, pool_owner=model, cifar_kernel_size=3)


def _register(depth: int):
    block, layers = LAYOUTS[depth]
    @register_model(f"resnet{depth}", family="imagenet_resnet", input_size=(3, 224, 224), norm="imagenet",
                    description=f"ResNet-{depth} ({block.__name__} x {'/'.join(map(str, layers))}, torchvision)")
    def build(num_classes=1000, in_chans=3, stem="imagenet"):
        return build_resnet(depth, num_classes, in_chans, stem)

    return build


for _d in LAYOUTS:
    _register(_d)
