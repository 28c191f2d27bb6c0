"""The torchvision families: counts pinned against torchvision's builders, stems, channels, ladders."""
from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from compressor.models import count_macs, count_params, create_model, family_ladder, get_entry, list_models
from compressor.models.stems import auto_stem, with_auto_stem

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

# zoo name -> the torchvision builder call it must equal (1000 classes, ImageNet stem, 3 channels)
TORCHVISION = {
    "mobilenetv2_035": (tvm.mobilenet_v2, {"width_mult": 0.35}),
    "mobilenetv2_050": (tvm.mobilenet_v2, {"width_mult": 0.5}),
    "mobilenetv2_075": (tvm.mobilenet_v2, {"width_mult": 0.75}),
    "mobilenetv2_100": (tvm.mobilenet_v2, {}),
    "mobilenetv2_140": (tvm.mobilenet_v2, {"width_mult": 1.4}),
    "mobilenetv3_small_050": (tvm.mobilenet_v3_small, {"width_mult": 0.5}),
    "mobilenetv3_small_075": (tvm.mobilenet_v3_small, {"width_mult": 0.75}),
    "mobilenetv3_small_100": (tvm.mobilenet_v3_small, {}),
    "mobilenetv3_large_050": (tvm.mobilenet_v3_large, {"width_mult": 0.5}),
    "mobilenetv3_large_075": (tvm.mobilenet_v3_large, {"width_mult": 0.75}),
    "mobilenetv3_large_100": (tvm.mobilenet_v3_large, {}),
    "efficientnet_b0": (tvm.efficientnet_b0, {}),
    "efficientnet_b1": (tvm.efficientnet_b1, {}),
    "efficientnet_b2": (tvm.efficientnet_b2, {}),
    "efficientnet_b3": (tvm.efficientnet_b3, {}),
    "shufflenetv2_x0_5": (tvm.shufflenet_v2_x0_5, {}),
    "shufflenetv2_x1_0": (tvm.shufflenet_v2_x1_0, {}),
    "shufflenetv2_x1_5": (tvm.shufflenet_v2_x1_5, {}),
    "shufflenetv2_x2_0": (tvm.shufflenet_v2_x2_0, {}),
    "regnety_400mf": (tvm.regnet_y_400mf, {}),
    "regnety_800mf": (tvm.regnet_y_800mf, {}),
    "regnety_1_6gf": (tvm.regnet_y_1_6gf, {}),
    "regnety_3_2gf": (tvm.regnet_y_3_2gf, {}),
    "resnet18": (tvm.resnet18, {}),
    "resnet34": (tvm.resnet34, {}),
    "resnet50": (tvm.resnet50, {}),
    "resnet101": (tvm.resnet101, {}),
}
# torchvision's published parameter counts (1000 classes), for the width-1 members.
PUBLISHED = {
    "mobilenetv2_100": 3_504_872, "mobilenetv3_small_100": 2_542_856, "mobilenetv3_large_100": 5_483_032,
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "shufflenetv2_x0_5": 1_366_792, "shufflenetv2_x1_0": 2_278_604,
    "shufflenetv2_x1_5": 3_503_624, "shufflenetv2_x2_0": 7_393_996, "regnety_400mf": 4_344_144,
    "regnety_800mf": 6_432_512, "regnety_1_6gf": 11_202_430, "regnety_3_2gf": 19_436_338,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
}
SMALLEST = {"mobilenetv2": "mobilenetv2_035", "mobilenetv3": "mobilenetv3_small_050",
            "efficientnet": "efficientnet_b0", "shufflenetv2": "shufflenetv2_x0_5", "regnety": "regnety_400mf",
            "imagenet_resnet": "resnet10"}


def _tv(name, num_classes=1000):
    builder, kwargs = TORCHVISION[name]
    if name.startswith("regnety"):
        with torch.device("cpu"):  # torchvision computes RegNet widths with tensor ops (not on "meta")
            return builder(weights=None, num_classes=num_classes, **kwargs)
    return builder(weights=None, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_params_equal_torchvision_builder(name):
    with torch.device("meta"):  # shapes only: fast for ResNet-101 too
        ours, theirs = create_model(name, num_classes=1000), _tv(name)
    assert count_params(ours) == count_params(theirs)
    if name in PUBLISHED:
        assert count_params(ours) == PUBLISHED[name]
    # key for key and shape for shape, so torchvision state dicts import unchanged
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name,macs", [
    # Convolution + linear multiply-accumulates at 224 px (torchvision's tables round these to
    # 0.30 / 0.06 / 0.39 / 0.04 / 0.40 / 1.81 GFLOPS, which also count SE scaling and pooling).
    ("mobilenetv2_100", 300_774_272), ("mobilenetv3_small_100", 56_510_400), ("efficientnet_b0", 385_814_752),
    ("shufflenetv2_x0_5", 40_476_448), ("regnety_400mf", 401_842_848), ("resnet18", 1_814_073_344),
])
def test_macs_pinned(name, macs):
    with torch.device("meta"):
        ours, theirs = create_model(name, num_classes=1000), _tv(name)
    assert count_macs(ours, (3, 224, 224)) == macs
    assert count_macs(theirs, (3, 224, 224)) == macs


def test_intermediate_resnet_depths_sit_between_18_and_34():
    ladder = family_ladder("imagenet_resnet")
    assert ladder == ["resnet10", "resnet18", "resnet22", "resnet28", "resnet34", "resnet50", "resnet101"]
    # BasicBlock counts per stage: resnet22 = 2,3,3,2 and resnet28 = 3,3,4,3 (depth = 2 + 2 x blocks)
    for name, blocks in (("resnet10", [1, 1, 1, 1]), ("resnet22", [2, 3, 3, 2]), ("resnet28", [3, 3, 4, 3])):
        with torch.device("meta"):
            m = create_model(name)
        assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == blocks
    assert family_ladder("mobilenetv2") == ["mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_075",
                                            "mobilenetv2_100", "mobilenetv2_140"]
    assert family_ladder("efficientnet") == [f"efficientnet_b{i}" for i in range(4)]
    assert family_ladder("shufflenetv2")[0] == "shufflenetv2_x0_5"
    assert get_entry("efficientnet_b3").input_size == (3, 300, 300)
    assert get_entry("mobilenetv3_small_100").norm == "imagenet"


def _final_hw(model, px):
    """Smallest feature map a convolution produces (squeeze-excitation convs on pooled 1x1 inputs excluded)."""
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(o.shape[-1]) if i[0].shape[-1] > 1 else None)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        out = model.eval()(torch.randn(2, model_in_chans(model), px, px))
    for h in hooks:
        h.remove()
    return min(sizes), out


def model_in_chans(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_cifar_stem_keeps_resolution_and_in_chans_work(family):
    name = SMALLEST[family]
    torch.manual_seed(0)
    hw_imagenet, _ = _final_hw(create_model(name, num_classes=10), 64)
    hw_cifar, out = _final_hw(create_model(name, num_classes=10, stem="cifar"), 32)
    assert hw_imagenet == 2   # total stride 32
    assert hw_cifar == 4      # total stride 8: 32 px ends in 4x4
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    gray = create_model(name, num_classes=5, in_chans=1, stem="cifar")
    assert model_in_chans(gray) == 1
    assert _final_hw(gray, 32)[1].shape == (2, 5)
    # only the stem convolution's input channels differ
    stem = next(m for m in gray.modules() if isinstance(m, nn.Conv2d))
    rgb = create_model(name, num_classes=5, stem="cifar")
    assert count_params(rgb) - count_params(gray) == stem.weight[:, :1].numel() * 2


def test_stem_auto_follows_input_size_and_bad_stem_is_rejected():
    from compressor.errors import CompressError

    assert auto_stem((3, 32, 32)) == "cifar" and auto_stem((3, 64, 64)) == "cifar"
    assert auto_stem((3, 96, 96)) == "imagenet" and auto_stem((3, 224, 224)) == "imagenet"
    builder = get_entry("mobilenetv2_035").builder
    assert with_auto_stem(builder, {}, (3, 32, 32)) == {"stem": "cifar"}
    assert with_auto_stem(builder, {"stem": "imagenet"}, (3, 32, 32)) == {"stem": "imagenet"}
    assert with_auto_stem(get_entry("resnet8").builder, {"shortcut": "B"}, (3, 32, 32)) == {"shortcut": "B"}
    with pytest.raises(CompressError, match="stem must be imagenet or cifar"):
        create_model("resnet18", stem="tiny")


def test_every_family_is_listed():
    names = set(list_models())
    assert set(TORCHVISION) | {"resnet10", "resnet22", "resnet28"} <= names


# blocks that add their input back, counted by hand from torchvision's block tables: MobileNetV2
# (t, c, n, s) repeats after each stage's first block, 0+1+2+3+2+2+0; MobileNetV3-small at width 0.5
# the 24->24, 40->40 (x2), 48->48 and 96->96 (x2) stride-1 blocks plus 40->48, which 0.5 makes
# 24->24; EfficientNet-B0 (n - 1) per stage, 0+1+1+2+2+3+0
RESIDUAL_BLOCKS = {"mobilenetv2_035": 10, "mobilenetv3_small_050": 7, "efficientnet_b0": 9}


@pytest.mark.parametrize("name,blocks", sorted(RESIDUAL_BLOCKS.items()))
def test_residual_branches_start_at_zero_so_each_block_starts_as_the_identity(name, blocks):
    from compressor.models.torchvision_families import zero_init_residual_branches

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, stem="cifar").eval()
    residual = [m for m in model.modules() if getattr(m, "use_res_connect", False)]
    assert len(residual) == blocks
    for block in residual:
        last_bn = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        assert torch.count_nonzero(last_bn.weight) == 0
        channels = last_bn.num_features
        x = torch.randn(2, channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), x)  # branch output is exactly the BN bias, 0
    # every other BatchNorm keeps torchvision's initialisation (scale 1)
    zeroed = {id([m for m in b.modules() if isinstance(m, nn.BatchNorm2d)][-1]) for b in residual}
    others = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in zeroed]
    assert others and all(torch.all(m.weight == 1) for m in others)
    # --option zero_init_last=false: torchvision's own initialisation, every scale 1
    plain = create_model(name, num_classes=10, stem="cifar", zero_init_last=False)
    assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert zero_init_residual_branches(plain) == blocks
    # only the starting values differ: the same keys and shapes, so checkpoints load either way
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_zero_init_last_is_an_option_of_the_residual_families_only():
    from compressor.errors import CompressError

    for name in ("shufflenetv2_x0_5", "regnety_400mf"):
        with pytest.raises(CompressError, match="does not accept these options"):
            create_model(name, num_classes=10, zero_init_last=False)
