"""Tests for compressor.data: loaders for every accepted layout, augmentation, sampling, errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import (DEMO_PATH, DataBundle, EpochSampler, ImageSplit, augment_batch, crop_flip,
                             load_data, make_loader, normalize, subset, synthetic_data)
from compressor.errors import CompressError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo() -> DataBundle:
    return load_data("demo")


def test_demo_shapes_classes_balance(demo):
    assert DEMO_PATH.is_file() and DEMO_PATH.stat().st_size < 4_000_000
    assert demo.name == "demo"
    assert demo.class_names == CIFAR10_CLASSES
    assert demo.num_classes == 10 and demo.input_size == (3, 32, 32)
    for split, n, per_class in ((demo.train, 5000, 500), (demo.test, 1000, 100)):
        assert len(split) == n
        assert split.images.shape == (n, 3, 32, 32)
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.labels.dtype == torch.int64
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    # real photos, not blank decodes
    assert 60 < demo.train.images.float().mean() < 190
    assert demo.train.images.float().std() > 30


def test_demo_returns_independent_copies(demo):
    other = load_data("demo")
    other.train.images[0].zero_()
    assert demo.train.images[0].any()


def test_demo_image_size_resizes():
    b = load_data("demo", image_size=40)
    assert b.input_size == (3, 40, 40) and b.test.images.shape == (1000, 3, 40, 40)


# ----------------------------------------------------------------------------- CIFAR python version
def _dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _fake_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _make_cifar10(d, n_per_batch=4, protocol=2):
    d.mkdir(parents=True)
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", {b"data": _fake_images(n_per_batch, i),
                                      b"labels": [(i + j) % 10 for j in range(n_per_batch)]}, protocol)
    _dump(d / "test_batch", {b"data": _fake_images(3, 99), b"labels": [9, 0, 5]}, protocol)
    _dump(d / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, protocol)
    return d


def _make_cifar100(d, protocol=pickle.HIGHEST_PROTOCOL):
    d.mkdir(parents=True)
    _dump(d / "train", {b"data": _fake_images(6, 1), b"fine_labels": [0, 99, 5, 5, 42, 7],
                        b"coarse_labels": [0] * 6}, protocol)
    _dump(d / "test", {b"data": _fake_images(2, 2), b"fine_labels": [99, 1], b"coarse_labels": [0, 0]}, protocol)
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [b"x"] * 20}, protocol)
    return d


def test_cifar10_python_dir(tmp_path):
    d = _make_cifar10(tmp_path / "cifar-10-batches-py")
    for spec in (d, tmp_path):  # the dir itself and its parent
        b = load_data(str(spec))
        assert b.name == "cifar10" and b.class_names == CIFAR10_CLASSES
        assert len(b.train) == 20 and len(b.test) == 3
        assert b.train.images.shape == (20, 3, 32, 32) and b.train.images.dtype == torch.uint8
        assert b.test.labels.tolist() == [9, 0, 5]
        assert b.train.labels[:4].tolist() == [1, 2, 3, 4]
        # row layout: 1024 R, then 1024 G, then 1024 B, each row-major 32x32
        raw = _fake_images(3, 99)
        assert torch.equal(b.test.images[1], torch.from_numpy(raw[1]).view(3, 32, 32))


def test_cifar100_python_dir(tmp_path):
    d = _make_cifar100(tmp_path / "cifar-100-python")
    for spec in (d, tmp_path):
        b = load_data(str(spec))
        assert b.name == "cifar100" and b.num_classes == 100 and b.class_names[42] == "c42"
        assert b.train.labels.tolist() == [0, 99, 5, 5, 42, 7]
        assert b.test.labels.tolist() == [99, 1]
        assert b.input_size == (3, 32, 32)


def test_cifar_incomplete_dir(tmp_path):
    d = _make_cifar10(tmp_path / "c10")
    (d / "data_batch_3").unlink()
    with pytest.raises(CompressError, match="data_batch_3"):
        load_data(str(d))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.getcwd, ())

    d = _make_cifar10(tmp_path / "c10")
    _dump(d / "test_batch", {b"data": Evil(), b"labels": []}, 2)
    with pytest.raises(CompressError, match="test_batch"):
        load_data(str(d))


# ----------------------------------------------------------------------------- ImageFolder
def _write(path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _make_folder(root, test_name="val", sizes=((8, 8),)):
    for split in ("train", test_name):
        for ci, (cls, color) in enumerate((("cat", (250, 0, 0)), ("dog", (0, 0, 250)))):
            for k, size in enumerate(sizes):
                ext = "png" if k % 2 == 0 else "jpg"
                _write(root / split / cls / f"{k:02d}.{ext}", size, color)
    return root


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder(tmp_path, test_name):
    root = _make_folder(tmp_path / "ds", test_name, sizes=((8, 8), (8, 8), (8, 8)))
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    b = load_data(str(root))
    assert b.name == "imagefolder" and b.class_names == ["cat", "dog"]
    assert len(b.train) == 6 and len(b.test) == 6
    assert b.train.images.shape == (6, 3, 8, 8) and b.train.images.dtype == torch.uint8
    assert b.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    cat, dog = b.train.images[0].float().mean((1, 2)), b.train.images[3].float().mean((1, 2))
    assert cat[0] > 200 and cat[2] < 50 and dog[2] > 200 and dog[0] < 50


def test_imagefolder_mixed_sizes_resized(tmp_path):
    root = _make_folder(tmp_path / "ds", sizes=((12, 10), (20, 16), (7, 9)))
    b = load_data(str(root))  # sizes vary and no model family given: 32 px
    assert b.input_size == (3, 32, 32) and b.test.images.shape == (6, 3, 32, 32)
    assert load_data(str(root), default_size=10).input_size == (3, 10, 10)  # the family's default
    b = load_data(str(root), image_size=6)
    assert b.input_size == (3, 6, 6)
    assert b.train.images[0].float().mean((1, 2))[0] > 200  # colour survives the resize


def test_imagefolder_grayscale_becomes_rgb(tmp_path):
    root = _make_folder(tmp_path / "ds")
    img = Image.new("L", (8, 8), 128)
    img.save(root / "train" / "cat" / "gray.png")
    b = load_data(str(root))
    assert b.input_size == (3, 8, 8) and len(b.train) == 3


# ----------------------------------------------------------------------------- errors
def test_error_missing_path(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_data(str(tmp_path / "nope"))


def test_error_file_not_dir(tmp_path):
    f = tmp_path / "data.tar.gz"
    f.write_bytes(b"x")
    with pytest.raises(CompressError, match="is a file, not a directory"):
        load_data(str(f))


def test_error_empty_dir(tmp_path):
    with pytest.raises(CompressError, match="is empty"):
        load_data(str(tmp_path))


def test_error_unknown_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "images").mkdir()
    with pytest.raises(CompressError, match="unknown data layout") as e:
        load_data(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "ImageFolder" in msg and "CIFAR-10" in msg and "demo" in msg


def test_error_missing_test_split(tmp_path):
    _write(tmp_path / "train" / "a" / "0.png", (4, 4), (1, 2, 3))
    with pytest.raises(CompressError, match="no val/ or test/"):
        load_data(str(tmp_path))


def test_error_no_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.txt").write_text("x")
    with pytest.raises(CompressError, match="has no images"):
        load_data(str(tmp_path))


def test_error_undecodable_image(tmp_path):
    root = _make_folder(tmp_path / "ds")
    bad = root / "val" / "dog" / "broken.jpg"
    bad.write_text("this is text, not a JPEG")
    with pytest.raises(CompressError, match="cannot decode image file") as e:
        load_data(str(root))
    assert "broken.jpg" in str(e.value)


def test_error_class_mismatch(tmp_path):
    root = _make_folder(tmp_path / "ds")
    _write(root / "train" / "bird" / "0.png", (8, 8), (0, 250, 0))
    with pytest.raises(CompressError, match="class folders differ") as e:
        load_data(str(root))
    assert "bird" in str(e.value)


def test_errors_are_one_line(tmp_path):
    for spec in (str(tmp_path / "nope"), str(tmp_path)):
        with pytest.raises(CompressError) as e:
            load_data(spec)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- augmentation
def test_crop_flip_pinned_by_hand():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    # top=0, left=1 with pad=2: shifted down 2 rows and right 1 column, zeros at the border
    out = crop_flip(x, torch.tensor([0]), torch.tensor([1]), None, pad=2)
    assert out[0, 0].tolist() == [[0, 0, 0, 0],
                                  [0, 0, 0, 0],
                                  [0, 0, 1, 2],
                                  [0, 4, 5, 6]]
    # top=left=pad is the identity; with flip the columns are mirrored
    assert torch.equal(crop_flip(x, torch.tensor([2]), torch.tensor([2]), None, pad=2), x)
    assert torch.equal(crop_flip(x, torch.tensor([2]), torch.tensor([2]), torch.tensor([True]), pad=2), x.flip(-1))
    # crop then flip: rows 3..6 / cols 4..7 of the padded image, mirrored
    out = crop_flip(x, torch.tensor([3]), torch.tensor([4]), torch.tensor([True]), pad=2)
    assert out[0, 0].tolist() == [[0, 0, 7, 6],
                                  [0, 0, 11, 10],
                                  [0, 0, 15, 14],
                                  [0, 0, 0, 0]]


def test_augment_pad4_matches_reference():
    g = torch.Generator().manual_seed(123)
    x = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = augment_batch(x, torch.Generator().manual_seed(7), pad=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    g = torch.Generator().manual_seed(7)  # the documented draw order
    top = torch.randint(0, 9, (16,), generator=g)
    left = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):  # per-image reference (the library itself has no loop)
        ref = padded[i, :, top[i]:top[i] + 32, left[i]:left[i] + 32]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(out[i], ref), i
        # zeros exactly where the crop leaves the image
        if top[i] < 4:
            assert not out[i, :, : 4 - top[i]].any()
    assert flip.any() and (~flip).any() and (top != 4).any()


def test_augment_flip_only_and_seeds():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=0, flip=True)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and same.any() and flipped.any()
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    c = augment_batch(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, torch.Generator(), pad=0, flip=False), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_matches_cpu():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    cpu = augment_batch(x, torch.Generator().manual_seed(3))
    gpu = augment_batch(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_normalize_by_hand():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).repeat(1, 2, 1, 1)
    y = normalize(x, mean=(0.2, 0.5), std=(0.5, 0.25))
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([-0.4, 0.0, 1.6]))
    torch.testing.assert_close(y[0, 1, 0], torch.tensor([-2.0, -1.2, 2.0]))
    with pytest.raises(CompressError, match="channels"):
        normalize(x, mean=(0.5,) * 3, std=(0.5,) * 3)


# ----------------------------------------------------------------------------- sampling / loading
def test_epoch_sampler():
    a = list(EpochSampler(100, shuffle=True, seed=3))
    s = EpochSampler(100, shuffle=True, seed=3)
    assert list(s) == a and sorted(a) == list(range(100)) and a != list(range(100))
    s.set_epoch(1)
    b = list(s)
    assert b != a and sorted(b) == list(range(100))
    s.set_epoch(0)
    assert list(s) == a
    assert list(EpochSampler(100, shuffle=True, seed=4)) != a
    assert list(EpochSampler(5, shuffle=False, seed=3)) == [0, 1, 2, 3, 4]
    assert len(s) == 100
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert b == torch.randperm(100, generator=g).tolist()


def test_make_loader_batches():
    data = synthetic_data(num_classes=4, n_train=70, n_test=10)
    loader = make_loader(data.train, 32, shuffle=True, seed=0)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 6]
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == sorted(data.train.labels.tolist())
    # images and labels stay paired
    idx = list(EpochSampler(70, shuffle=True, seed=0))[:32]
    assert torch.equal(x, data.train.images[idx]) and torch.equal(y, data.train.labels[idx])
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], y) or not torch.equal(next(iter(loader))[0], x)
    assert len(make_loader(data.train, 32, shuffle=False, drop_last=True)) == 2


def test_make_loader_through_accelerate():
    accelerate = pytest.importorskip("accelerate")
    data = synthetic_data(num_classes=4, n_train=50, n_test=10)
    plain = make_loader(data.train, 16, shuffle=True, seed=9)
    prepared = accelerate.Accelerator(cpu=True).prepare(make_loader(data.train, 16, shuffle=True, seed=9))
    for epoch in (0, 1):
        plain.sampler.set_epoch(epoch)
        prepared.set_epoch(epoch)
        a = [y for _, y in plain]
        b = [y for _, y in prepared]
        assert len(b) == 4 and all(torch.equal(u, v) for u, v in zip(a, b))


def test_subset_and_synthetic():
    data = synthetic_data(num_classes=3, input_size=(1, 16, 12), n_train=30, n_test=9, seed=1)
    assert data.input_size == (1, 16, 12) and data.num_classes == 3 and data.name == "synthetic"
    assert torch.bincount(data.train.labels).tolist() == [10, 10, 10]
    again = synthetic_data(num_classes=3, input_size=(1, 16, 12), n_train=30, n_test=9, seed=1)
    assert torch.equal(again.train.images, data.train.images)
    part = subset(data.train, [3, 0, 7])
    assert isinstance(part, ImageSplit) and len(part) == 3
    assert torch.equal(part.images[1], data.train.images[0]) and part.labels[2] == data.train.labels[7]
    assert len(subset(data.train, range(5))) == 5 and len(subset(data.train, slice(10, None))) == 20
    assert len(subset(data.train, data.train.labels == 0)) == 10


def test_imagefolder_uniform_non_square_kept(tmp_path):
    root = _make_folder(tmp_path / "ds", sizes=((12, 8), (12, 8)))  # PIL size is (W, H)
    b = load_data(str(root))
    assert b.input_size == (3, 8, 12)
    assert load_data(str(root), image_size=8).input_size == (3, 8, 8)


def test_crop_policy_crops_without_flipping(tmp_path, monkeypatch):
    """--augment crop: the cifar batch augmentation minus the flip, in training, BN recalibration and
    the guide-cache key; its evaluation view crops nothing, as cifar's."""
    from compressor import trainer
    from compressor.config import TrainConfig, resolve_config
    from compressor.data import batch_augmentation, resolve_policy
    from compressor.data.view import eval_view
    from compressor.guides import augmentation_policy
    from compressor.checkpoint import load_model
    from compressor.pipeline import train_model

    assert resolve_policy("crop", (28, 28), "cifar_resnet") == ("crop", "given")
    assert batch_augmentation("crop") == {"flip": False} and batch_augmentation("cifar") == {}
    assert batch_augmentation("imagenet") is None and batch_augmentation("none") is None
    assert eval_view("crop", 28).crop == eval_view("cifar", 28).crop == 1.0
    assert augmentation_policy("crop") == {"policy": "crop", "pad": 4, "flip": False}
    assert augmentation_policy("cifar") == {"policy": "cifar", "pad": 4, "flip": True}  # old cache keys stand
    with pytest.raises(CompressError, match="cifar, crop, imagenet, none or auto"):
        resolve_policy("mirror", (28, 28), None)
    # auto: grayscale images (digits, text) get the small crop without a mirror at any size; colour
    # ones the flip, and imagenet (RandomResizedCrop + flip) from 64 px or for the imagenet families
    assert resolve_policy("auto", (28, 28), "cifar_resnet", 1)[0] == "crop"
    assert resolve_policy("auto", (28, 28), "cifar_resnet", 3)[0] == "cifar"
    assert resolve_policy("auto", (96, 96), None, 3)[0] == "imagenet"
    assert resolve_policy("auto", (28, 28), "imagenet_resnet", 3)[0] == "imagenet"
    assert resolve_policy("auto", (96, 96), None, 1) == (
        "crop", "auto: 96-px grayscale images -> pad-4 crop, no flip: a mirror or a large crop changes digits "
                "and text; --augment imagenet for photos")
    assert resolve_policy("auto", (28, 28), "imagenet_resnet", 1)[0] == "crop"
    assert resolve_policy("cifar", (28, 28), None, 1) == ("cifar", "given")

    seen = []
    real = trainer.augment_batch

    def recording(images, generator, **kwargs):
        seen.append(kwargs.get("flip", True))
        return real(images, generator, **kwargs)

    monkeypatch.setattr(trainer, "augment_batch", recording)
    cfg = resolve_config(TrainConfig, None, dict(arch="cnn2", out=str(tmp_path / "m.safetensors"), epochs=1,
                                                 batch_size=16, augment="crop"))
    train_model(cfg, data=synthetic_data(num_classes=4, n_train=32, n_test=16, seed=1), show_progress=False)
    assert seen and not any(seen)  # every training batch cropped, none flipped
    _, meta = load_model(tmp_path / "m.safetensors")
    assert meta.metrics["augment"] == "crop"


def test_grayscale_folder_trains_without_the_flip_by_default(tmp_path):
    """A 1-channel folder under --augment auto: the crop policy, said on the augment line, recorded."""
    from data_folders import write_uniform_folder

    gray = write_uniform_folder(tmp_path / "gray", 12, mode="L")
    b = load_data(str(gray))
    assert b.input_size[0] == 1 and b.augment == "crop"
    assert any(n.startswith("augment: crop (auto: 12-px grayscale images -> pad-4 crop, no flip") for n in b.notes)
    colour = write_uniform_folder(tmp_path / "rgb", 12)
    assert load_data(str(colour)).augment == "cifar"
