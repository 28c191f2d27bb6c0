"""Input adaptation for torchvision models: input channels and the small-image stem.

``stem="imagenet"`` keeps torchvision's layout (total stride 32: a stride-2
stem and a second early downsampling). ``stem="cifar"`` is for 32-96 px
images: the stem convolution runs at stride 1 (ResNet: 3x3 instead of 7x7)
and the first downsampling after it (ResNet/ShuffleNet: the max-pool;
MobileNet/EfficientNet/RegNet: the first stride-2 block) is removed, so the
total stride is 8 and a 32 px image ends in a 4x4 feature map instead of 1x1.
Only the stem changes shape, so every other tensor keeps torchvision's name
and shape. Because for most families only strides change, a cifar-stem model
carries one extra state-dict entry, ``small_image_stem``: stock torchvision
refuses its weights (``load_state_dict(strict=True)`` names the unexpected
key) rather than loading them and computing something else; compress fills
the key in for checkpoints written before it existed. ``stem="auto"`` resolves to ``cifar`` for inputs of at most
:data:`CIFAR_STEM_MAX_PX` pixels and to ``imagenet`` otherwise.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import CompressError

STEMS = ("imagenet", "cifar")
CIFAR_STEM_MAX_PX = 64
SMALL_IMAGE_PX = 32  # the size a ``stem="cifar"`` model is built for (CIFAR's), unless told otherwise


def check_stem(stem: str) -> str:
    stem = str(stem).lower()
    if stem not in STEMS:
        raise CompressError(f"stem must be imagenet or cifar, got {stem!r} (e.g. --option stem=cifar)")
    return stem


def auto_stem(input_size) -> str:
    """The stem for images of ``input_size`` (C, H, W): cifar up to 64 px, else imagenet."""
    return "cifar" if max(int(input_size[-1]), int(input_size[-2])) <= CIFAR_STEM_MAX_PX else "imagenet"


def accepts_stem(builder) -> bool:
    return "stem" in inspect.signature(builder).parameters


def with_auto_stem(builder, kwargs: dict, input_size) -> dict:
    """``kwargs`` plus ``stem`` chosen from ``input_size`` when the builder takes one and none (or auto) is given."""
    if not accepts_stem(builder) or kwargs.get("stem", "auto") != "auto":
        return dict(kwargs)
    return {**kwargs, "stem": auto_stem(input_size)}


def replace_conv(parent: nn.Module, attr: str, *, in_chans: int | None = None, kernel_size: int | None = None,
                 stride: int | None = None) -> nn.Conv2d:
    """Swap ``parent.<attr>`` (a Conv2d) for a fresh one with some settings changed."""
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    k = kernel_size or old.kernel_size[0]
    new = nn.Conv2d(in_chans or old.in_channels, old.out_channels, k, stride=stride or old.stride,
                    padding=k // 2, groups=old.groups, bias=old.bias is not None)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return new


def unstride(module: nn.Module) -> None:
    """Every stride-2 convolution inside ``module`` runs at stride 1 (weights unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)


def first_strided(blocks) -> nn.Module:
    """The first block in ``blocks`` that holds a stride-2 convolution."""
    for block in blocks:
        if any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in block.modules()):
            return block
    raise ValueError("no strided block")  # not reachable for the registered families


def adapt_stem(model: nn.Module, stem_parent: nn.Module, stem_attr: str, in_chans: int, stem: str,
               early_blocks=None, pool_owner: nn.Module | None = None, cifar_kernel_size: int | None = None) -> nn.Module:
    """Apply ``in_chans`` and the stem choice to a torchvision model.

    ``stem_parent.<stem_attr>`` is the stem convolution. The cifar stem runs it
    at stride 1 and removes the next downsampling: ``pool_owner.maxpool``
    when given, else every stride-2 conv of the first strided block in ``early_blocks``;
    ``cifar_kernel_size`` also shrinks the stem's kernel then (ResNet: 7x7 -> 3x3).
    """
    cifar = check_stem(stem) == "cifar"
    if in_chans != 3 or cifar:
        replace_conv(stem_parent, stem_attr, in_chans=in_chans, stride=1 if cifar else None,
                     kernel_size=cifar_kernel_size if cifar else None)
    if cifar:
        if pool_owner is not None:
            pool_owner.maxpool = nn.Identity()
        else:
            unstride(first_strided(early_blocks))
        mark_small_image_stem(model)
    return model


# A state-dict key no stock torchvision model has: a small-image-stem model's weights then refuse to
# load there (strict=True: "Unexpected key(s) in state_dict: 'small_image_stem'") instead of
# loading silently and computing something else (only strides differ for MobileNet/EfficientNet/
# RegNet/ShuffleNet: same names, same shapes).
SMALL_IMAGE_STEM_KEY = "small_image_stem"


def mark_small_image_stem(model: nn.Module) -> None:
    """Record in the state dict that ``model`` has the small-image stem (see :data:`SMALL_IMAGE_STEM_KEY`)."""
    model.register_buffer(SMALL_IMAGE_STEM_KEY, torch.ones(()), persistent=True)
