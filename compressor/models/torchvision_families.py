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
"""
from __future__ import annotations

from functools import partial

import torch
import torchvision.models as tvm

from .registry import register_model
from .stems import adapt_stem


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

    @register_model(name, family=family, input_size=(3, px, px), norm="imagenet", description=description)
    def build(num_classes=1000, in_chans=3, stem="imagenet"):
        return construct(num_classes=num_classes, in_chans=in_chans, stem=stem)

    return build


for _name in FAMILIES:
    _register(_name)
