"""Interop that cannot lie: a student's weights either load into the stock torchvision model and
compute the same outputs (stem=imagenet), or refuse to load there (stem=cifar: the strides differ)."""
import pytest
import torch
import torchvision.models as tvm

from compressor.checkpoint import load_state_strict
from compressor.models import create_model
from compressor.models.stems import SMALL_IMAGE_STEM_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STOCK = {  # the smallest member of every torchvision family in the zoo, and its stock builder
    "mobilenetv2_035": lambda n: tvm.mobilenet_v2(weights=None, num_classes=n, width_mult=0.35),
    "mobilenetv3_small_050": lambda n: tvm.mobilenet_v3_small(weights=None, num_classes=n, width_mult=0.5),
    "efficientnet_b0": lambda n: tvm.efficientnet_b0(weights=None, num_classes=n),
    "shufflenetv2_x0_5": lambda n: tvm.shufflenet_v2_x0_5(weights=None, num_classes=n),
    "regnety_400mf": lambda n: tvm.regnet_y_400mf(weights=None, num_classes=n),
    "resnet18": lambda n: tvm.resnet18(weights=None, num_classes=n),
}


@pytest.mark.parametrize("name", list(STOCK))
def test_imagenet_stem_weights_load_into_stock_torchvision_and_agree(name):
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10, stem="imagenet").eval()
    stock = STOCK[name](10).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(256, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), stock(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.999
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(STOCK))
def test_cifar_stem_weights_refuse_to_load_into_stock_torchvision(name):
    ours = create_model(name, num_classes=10, stem="cifar")
    assert SMALL_IMAGE_STEM_KEY in ours.state_dict()
    with pytest.raises(RuntimeError, match=SMALL_IMAGE_STEM_KEY):
        STOCK[name](10).load_state_dict(ours.state_dict(), strict=True)


def test_checkpoints_without_the_marker_still_load_in_compress():
    src = create_model("mobilenetv3_small_050", num_classes=10, stem="cifar")
    old = {k: v for k, v in src.state_dict().items() if k != SMALL_IMAGE_STEM_KEY}  # an earlier version's file
    dst = create_model("mobilenetv3_small_050", num_classes=10, stem="cifar")
    load_state_strict(dst, old, "mobilenetv3_small_050", "old.safetensors")
    assert torch.equal(dst.features[0][0].weight, src.features[0][0].weight)
    # torchvision's own weights import into a cifar-stem model the same way (same names and shapes)
    stock = tvm.mobilenet_v3_small(weights=None, num_classes=10, width_mult=0.5)
    load_state_strict(dst, stock.state_dict(), "mobilenetv3_small_050", "torchvision.pth")
