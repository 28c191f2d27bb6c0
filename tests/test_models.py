import pytest
import torch

from compressor.errors import CompressError
from compressor.models import (count_macs, count_params, create_model, family_ladder, get_entry, list_families,
                               list_models)

# DESIGN.md section 2: 10 classes, option-A / option-B shortcuts.
CIFAR_RESNET_PARAMS = {
    "resnet8": (75_290, 78_042),
    "resnet20": (269_722, 272_474),
    "resnet56": (853_018, 855_770),
    "resnet110": (1_727_962, 1_730_714),
}


@pytest.mark.parametrize("name", sorted(CIFAR_RESNET_PARAMS))
def test_cifar_resnet_param_counts(name):
    a, b = CIFAR_RESNET_PARAMS[name]
    assert count_params(create_model(name)) == a
    assert count_params(create_model(name, shortcut="B")) == b


def test_other_family_param_counts():
    # Published counts (100 classes): WRN-40-2 2.26M, WRN-16-2 0.70M (CRD/RepDistiller tables).
    assert count_params(create_model("wrn40_2", num_classes=100)) == 2_255_156
    assert count_params(create_model("wrn16_2", num_classes=100)) == 703_284
    # torchvision resnet18 with 1000 classes: 11,689,512.
    assert count_params(create_model("resnet18", num_classes=1000)) == 11_689_512
    # TAKD CNN-2 (CIFAR-10 book): conv 3*16*9+16, BN 32, conv 16*16*9+16, BN 32, fc 1024*10+10 = 13,082
    assert count_params(create_model("cnn2")) == 13_082


def test_resnet8_macs():
    # conv1 3*16*9*1024 + stage convs + fc 640 = 12,239,488 (about 12.5 M in the literature)
    assert count_macs(create_model("resnet8"), (3, 32, 32)) == 12_239_488


def test_every_model_runs_forward():
    # Shapes for every model on the meta device (no weights, no compute: the zoo holds ResNet-101 and
    # EfficientNet-B3); a real forward of the smallest member of each family is in test_models_torchvision.py.
    for name in list_models():
        size = list(get_entry(name).input_size)
        if size[1] > 64:
            size = [3, 64, 64]  # the ImageNet families are fully convolutional
        with torch.device("meta"):
            model = create_model(name, num_classes=7).eval()
            out = model(torch.randn(2, *size))
        assert out.shape == (2, 7), name
    for name in ("resnet8", "wrn16_1", "vgg8", "cnn2"):
        with torch.no_grad():
            assert create_model(name, num_classes=7).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_families_and_ladders():
    assert set(list_families()) >= {"cifar_resnet", "wrn", "vgg", "plain_cnn", "imagenet_resnet"}
    assert family_ladder("cifar_resnet") == ["resnet8", "resnet14", "resnet20", "resnet26", "resnet32",
                                             "resnet44", "resnet56", "resnet110"]
    assert family_ladder("plain_cnn") == ["cnn2", "cnn4", "cnn6", "cnn8", "cnn10"]
    assert family_ladder("vgg")[0] == "vgg8" and family_ladder("vgg")[-1] == "vgg19"
    assert {"wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"} <= set(family_ladder("wrn"))


def test_names_are_normalised_and_unknown_names_suggest():
    assert count_params(create_model("WRN-16-1")) == count_params(create_model("wrn16_1"))
    with pytest.raises(CompressError, match="Did you mean: resnet8"):
        create_model("resnet9")


def test_in_chans_and_cifar100_cnn_book():
    m = create_model("resnet8", in_chans=1)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    # CIFAR-100 book CNN-2 uses 32 channels
    assert count_params(create_model("cnn2", num_classes=100)) != count_params(create_model("cnn2", num_classes=10))
