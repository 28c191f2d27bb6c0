"""docs/preprocessing.md's recipe (Pillow + numpy) is the deploy bundle's predict.py code, and gives
the pixels and the model input ``compress eval`` gives (issue 21, preprocessing recipe)."""
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "preprocessing.md"
PREDICT = REPO / "export" / "bundle_predict.py"


def doc_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/preprocessing.md has no python block"
    return blocks[0]


def predict_block() -> str:
    src = PREDICT.read_text()
    return src.split("# preprocessing-begin\n", 1)[1].split("# preprocessing-end\n", 1)[0]


@pytest.fixture(scope="module")
def recipe() -> dict:
    ns: dict = {}
    exec(compile(doc_block(), str(DOC), "exec"), ns)  # the doc's code itself, as a reader would paste it
    return ns


def native_uint8_resize() -> bool:
    """torchvision resizes uint8 in the fixed-point kernel the recipe copies (AVX2/AVX-512/ARM CPUs)."""
    from torchvision.transforms.v2.functional._geometry import InterpolationMode, _do_native_uint8_resize_on_cpu

    return _do_native_uint8_resize_on_cpu(InterpolationMode.BILINEAR)


needs_uint8_kernel = pytest.mark.skipif(not native_uint8_resize(), reason="torchvision resizes in float32 here")


def test_one_source_of_truth():
    """The doc's block is predict.py's preprocessing, character for character."""
    assert doc_block() == predict_block()
    assert "import torch" not in doc_block() and "compressor" not in doc_block()


def test_resize_weights_by_hand(recipe):
    # 4 -> 2: scale 2, support 2; output 0 centred at 1.0 covers inputs 0..2 with triangle weights
    # 1 - |(j - 1 + 0.5) / 2| = 0.75, 0.75, 0.25 -> normalised 3/7, 3/7, 1/7; max 3/7 -> 16 bits
    # (the largest b with 0.5 + 3/7 * 2**b < 2**15: 28087 at b = 16, 56174 at 17), so
    # 3/7 * 65536 = 28086.9 -> 28087 and 1/7 * 65536 = 9362.3 -> 9362 (they sum to 65536).
    k, bits = recipe["resize_weights"](4, 2)
    assert bits == 16
    assert k.tolist() == [[28087, 28087, 9362, 0], [0, 9362, 28087, 28087]]
    # 2 -> 4 (upscale): support 1; output 0 centred at 0.25 -> inputs 0 only (weight 1, 14 bits)
    k, bits = recipe["resize_weights"](2, 4)
    assert bits == 14 and k[0].tolist() == [16384, 0] and k[1].tolist() == [12288, 4096]


def test_fit_shapes_and_crop_offsets(recipe):
    fit = recipe["fit"]
    tall = np.arange(73 * 64 * 3).reshape(73, 64, 3).astype(np.uint8)
    # already covers 64x64: no resize; top = round((73 - 64) / 2) = round(4.5) = 4 (Python rounds half to even)
    assert np.array_equal(fit(tall, (64, 64)), tall[4:68])
    assert np.array_equal(fit(tall[:71], (64, 64)), tall[4:68])  # round(3.5) = 4
    assert fit(tall, (73, 64)) is tall  # the size already, no crop: the same array
    assert fit(tall, (64, 64), 0.875).shape == (64, 64, 3)  # box round(64 / 0.875) = 73 wide: upscale, crop
    wide = np.zeros((64, 128, 3), np.uint8)
    assert fit(wide, (32, 64)).shape == (32, 64, 3)  # a plain 2x shrink
    assert fit(wide, (32, 32)).shape == (32, 32, 3)  # cover 32x64, the centre 32 columns


@needs_uint8_kernel
@pytest.mark.parametrize("size,crop", [((64, 64), 0.875), ((20, 20), 1.0), ((24, 40), 1.0), ((224, 224), 0.875)])
def test_fit_equals_compress_pixels_on_demo(recipe, size, crop):
    from compressor.data.formats import decode_demo
    from compressor.data.transforms import fit_image

    x = decode_demo()[0][1][0][:64]
    ref = fit_image(x, size, crop).numpy()
    mine = np.stack([recipe["fit"](im.numpy().transpose(1, 2, 0), size, crop).transpose(2, 0, 1) for im in x])
    assert mine.shape == ref.shape and np.array_equal(mine, ref)


@needs_uint8_kernel
@pytest.mark.parametrize("size,crop", [((64, 64), 0.875), ((32, 32), 1.0), ((100, 50), 1.0), ((180, 240), 0.875)])
def test_fit_equals_compress_pixels_on_odd_photos(recipe, size, crop):
    from compressor.data.transforms import fit_image

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 157, 211), dtype=np.uint8))
    ref = fit_image(x, size, crop).numpy()
    mine = np.stack([recipe["fit"](im.numpy().transpose(1, 2, 0), size, crop).transpose(2, 0, 1) for im in x])
    assert np.array_equal(mine, ref)


@needs_uint8_kernel
@pytest.mark.parametrize("policy", ["cifar", "imagenet"])
def test_preprocess_equals_eval_view_and_onnx_prepare(recipe, policy, tmp_path):
    """A photo file through the recipe == the folder eval view + normalisation compress feeds the model."""
    from PIL import Image

    from compressor.data.formats import decode_file
    from compressor.data.transforms import normalize
    from compressor.data.view import eval_view

    rng = np.random.default_rng(1)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(photo)
    size, mean, std = (48, 48), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    view = eval_view(policy, size)  # a folder of mixed sizes: native None
    p = {"channels": 3, "store": list(view.store), "size": list(size), "crop": view.crop, "mean": list(mean),
         "std": list(std), "normalize_in_graph": False}
    x = recipe["preprocess"](photo, p)
    ref = normalize(view.apply(decode_file(str(photo)))[None], mean, std).numpy()
    assert x.dtype == np.float32 and x.shape == (1, 3, 48, 48)
    assert np.array_equal(x, ref)
    p["normalize_in_graph"] = True
    raw = view.apply(decode_file(str(photo)))[None].numpy().astype(np.float32) / 255.0  # OnnxModel.prepare's
    assert np.array_equal(recipe["preprocess"](photo, p), raw)


def test_jpeg_decoding_matches_compress(recipe):
    """Pillow + convert('RGB') decodes the demo JPEGs to compress's pixels (torchvision's decoder)."""
    from safetensors import safe_open

    from compressor.data.formats import DEMO_PATH, decode_demo

    with safe_open(str(DEMO_PATH), "pt") as f:
        t = {k: f.get_tensor(k) for k in ("test_jpeg", "test_offsets")}
        prefix = f.get_tensor("jpeg_prefix") if "jpeg_prefix" in f.keys() else torch.empty(0, dtype=torch.uint8)
    off = t["test_offsets"].tolist()
    x = decode_demo()[0][1][0]
    for i in range(0, 100):
        data = torch.cat([prefix, t["test_jpeg"][off[i]:off[i + 1]]]).numpy().tobytes()
        img = recipe["load_image"](io.BytesIO(data), 3)
        assert np.array_equal(img.transpose(2, 0, 1), x[i].numpy())
