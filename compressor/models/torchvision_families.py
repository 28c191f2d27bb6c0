"""torchvision's mobile families, built with torchvision's own builders
(``weights=None``: nothing is ever downloaded).

Names: ``<family>_<size>``, the size written the way torchvision writes it
with ``.`` -> ``_`` and width multipliers in hundredths:

================  ==============================================  =======
family            members (smallest first)                        input
================  ==============================================  =======
mobilenetv2       mobilenetv2_035, _050, _075, _100, _140          224
mobilenetv3       mobilenetv3_small_050, _small_075, _small_100,   224
                  mobilenetv3_large_050, _large_075, _large_100
efficientnet      efficientnet_b0, _b1, _b2, _b3                   224/240/288/300
shufflenetv2      shufflenetv2_x0_5, _x1_0, _x1_5, _x2_0           224
regnety           regnety_400mf, _800mf, _1_6gf, _3_2gf            224
================  ==============================================  =======

Every builder takes ``num_classes``, ``in_chans`` (the stem convolution is
replaced for other than 3 channels) and ``stem`` (``imagenet`` or ``cifar``,
see :mod:`.stems`). With ``in_chans=3`` and ``stem="imagenet"`` the state
dict is torchvision's, key for key, so torchvision checkpoints import as is.

MobileNetV2, MobileNetV3 and EfficientNet also take ``zero_init_last`` (default
true; ``--option zero_init_last=false`` gives torchvision's initialisation):
the scale of the last BatchNorm of every block that adds its input back
(``use_res_connect``) starts at zero, so each such block starts as the
identity and the network as a shallower one -- the zero-gamma of Goyal et
al. 2017 and He et al. 2019 ("Bag of Tricks"), timm's ``zero_init_last`` for
its ResNets, applied to the inverted-residual blocks. Only the starting
weights change (a checkpoint loads the same either way). Why (issue 18;
docs/results.md §6, "Zero-initialised residual branches"): MobileNetV2-0.35
trained alone for 3 epochs on 540 96-px photos scored 10.7 / 18.0 / 8.3 %
on the test split after epoch 1 (chance 10 %) with torchvision's
initialisation and 17.3 / 21.7 / 16.3 % with it, and ended at 22.4 -> 27.8 %
(every seed higher, 3 seeds).
"""
from __future__ import annotations

from functools import partial

import torch
import torchvision.models as tvm

from ..bn_recalibration import batchnorm_layers
from .registry import register_model
from .stems import adapt_stem


# Families whose blocks add their input back (torchvision InvertedResidual / MBConv, ``use_res_connect``)
ZERO_INIT_FAMILIES = ("mobilenetv2", "mobilenetv3", "efficientnet")


def zero_init_residual_branches(model: torch.nn.Module) -> int:
    """Zero the scale of the last BatchNorm in the branch of every block that adds its input back
    (``use_res_connect``): the block starts as the identity. Returns the number of blocks."""
    branches = (batchnorm_layers(m) for m in model.modules() if getattr(m, "use_res_connect", False))
    last_norms = [norms[-1] for norms in branches if norms]
    for norm in last_norms:
        torch.nn.init.zeros_(norm.weight)
    return len(last_norms)


def _features_family(builder, num_classes, in_chans, stem, **kwargs):
    """MobileNetV2/V3 and EfficientNet: ``features[0][0]`` is the stem conv, ``features[1:]`` the blocks."""
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    return adapt_stem(model, model.features[0], "0", in_chans, stem, early_blocks=list(model.features)[1:])


def _shufflenet(builder, num_classes, in_chans, stem):
    model = builder(weights=None, num_classes=num_classes)
    return adapt_stem(model, model.conv1, "0", in_chans, stem, pool_owner=model)


def _regnet(builder, num_classes, in_chans, stem):
    device = torch.get_default_device()  # "meta" while profiling
    with torch.device("cpu"):  # torchvision computes RegNet's block widths with tensor ops
        model = builder(weights=None, num_classes=num_classes)
    model = model.to(device)
    return adapt_stem(model, model.stem, "0", in_chans, stem, early_blocks=list(model.trunk_output.block1))


# name -> (family, constructor(num_classes, in_chans, stem), default input px, description)
FAMILIES = {}
for _w in ("035", "050", "075", "100", "140"):
    FAMILIES[f"mobilenetv2_{_w}"] = ("mobilenetv2", partial(_features_family, tvm.mobilenet_v2,
                                                            width_mult=int(_w) / 100), 224,
                                     f"torchvision mobilenet_v2(width_mult={int(_w) / 100:g})")
for _size in ("small", "large"):
    for _w in ("050", "075", "100"):
        _b = getattr(tvm, f"mobilenet_v3_{_size}")
        FAMILIES[f"mobilenetv3_{_size}_{_w}"] = (
            "mobilenetv3", partial(_features_family, _b, width_mult=int(_w) / 100), 224,
            f"torchvision mobilenet_v3_{_size}(width_mult={int(_w) / 100:g})")
for _b, _px in (("b0", 224), ("b1", 240), ("b2", 288), ("b3", 300)):
    FAMILIES[f"efficientnet_{_b}"] = ("efficientnet", partial(_features_family, getattr(tvm, f"efficientnet_{_b}")),
                                      _px, f"torchvision efficientnet_{_b}")
for _x in ("0_5", "1_0", "1_5", "2_0"):
    FAMILIES[f"shufflenetv2_x{_x}"] = ("shufflenetv2", partial(_shufflenet, getattr(tvm, f"shufflenet_v2_x{_x}")),
                                       224, f"torchvision shufflenet_v2_x{_x}")
for _r in ("400mf", "800mf", "1_6gf", "3_2gf"):
    FAMILIES[f"regnety_{_r}"] = ("regnety", partial(_regnet, getattr(tvm, f"regnet_y_{_r}")), 224,
                                 f"torchvision regnet_y_{_r}")


def _register(name: str):
    family, construct, px, description = FAMILIES[name]

    def build(num_classes=1000, in_chans=3, stem="imagenet"):
        return construct(num_classes=num_classes, in_chans=in_chans, stem=stem)

    def build_zero_init(num_classes=1000, in_chans=3, stem="imagenet", zero_init_last=True):
        model = build(num_classes, in_chans, stem)
        if zero_init_last:
            zero_init_residual_branches(model)
        return model

    # the registry reads a builder's options from its signature: only these families take zero_init_last
    builder = build_zero_init if family in ZERO_INIT_FAMILIES else build
    return register_model(name, family=family, input_size=(3, px, px), norm="imagenet",
                          description=description)(builder)


for _name in FAMILIES:
    _register(_name)
