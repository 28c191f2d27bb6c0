"""TAKD's plain CNNs (Mirzadeh et al. 2020): CNN-2/4/6/8/10.

Layer specs are the paper's: ``C<w>`` = 3x3 conv (padding 1) + BatchNorm + ReLU,
``P`` = 2x2 max-pool, ``F<w>`` = linear + ReLU, and a final linear layer with
``num_classes`` outputs. There are two books of specs, one for CIFAR-10 and one
for CIFAR-100; ``book="auto"`` (default) picks the CIFAR-100 book when
``num_classes > 10``.
"""
from __future__ import annotations

from torch import nn

from .registry import register_model

BOOKS = {
    "cifar10": {
        2: "C16 P C16 P",
        4: "C16 C16 P C32 C32 P",
        6: "C16 C16 P C32 C32 P C64 C64 P",
        8: "C16 C16 P C32 C32 P C64 C64 P C128 C128 P F64",
        10: "C32 C32 P C64 C64 P C128 C128 P C256 C256 C256 C256 P F128",
    },
    "cifar100": {
        2: "C32 P C32 P",
        4: "C32 C32 P C64 C64 P",
        6: "C32 C32 P C64 C64 P C128 C128",
        8: "C32 C32 P C64 C64 P C128 C128 P C256 C256 P F64",
        10: "C32 C32 P C64 C64 P C128 C128 P C256 C256 C256 C256 P F512",
    },
}


class PlainCNN(nn.Module):
    def __init__(self, spec: str, num_classes: int = 10, in_chans: int = 3, input_hw: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels, hw, flat = in_chans, input_hw, None
        for token in spec.split():
            kind, width = token[0], int(token[1:] or 0)
            if kind == "C":
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            elif kind == "P":
                layers.append(nn.MaxPool2d(2))
                hw //= 2
            elif kind == "F":
                if flat is None:
                    layers.append(nn.Flatten())
                    flat = channels * hw * hw
                layers += [nn.Linear(flat, width), nn.ReLU(inplace=True)]
                flat = width
            else:
                raise ValueError(f"bad layer token {token!r}")
        if flat is None:
            layers.append(nn.Flatten())
            flat = channels * hw * hw
        layers.append(nn.Linear(flat, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _register(depth: int):
    @register_model(f"cnn{depth}", family="plain_cnn", description=f"TAKD plain CNN-{depth}")
    def build(num_classes=10, in_chans=3, book="auto", input_hw=32):
        if book == "auto":
            book = "cifar100" if num_classes > 10 else "cifar10"
        if book not in BOOKS:
            raise ValueError(f"book must be one of {sorted(BOOKS)} or 'auto'")
        return PlainCNN(BOOKS[book][depth], num_classes=num_classes, in_chans=in_chans, input_hw=int(input_hw))

    return build


for _d in (2, 4, 6, 8, 10):
    _register(_d)
