"""One view of the data (issue 19, items 2, 4, 5 and data access by index): memory and stream give the
same training batches, fit_image covers non-square targets, one evaluation view for val and test
(demo/CIFAR included), and a class-spread sample that decodes only the sampled files."""
from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import (EvalView, as_eval, augment_batch, batch_augmentation, eval_view, fit_image, load_data,
                             load_sample, make_loader, spread_indices, subset)

SIZES = [(40, 40), (48, 64), (64, 48), (37, 53), (80, 60), (50, 50)]


def write_textured_folder(root, classes: int = 2, per_class: int = 6, same_val: bool = True, seed: int = 0):
    """train/ and val/ of random-noise PNGs (lossless) of varying sizes; with ``same_val`` val/ holds
    the very same files as train/ (same names, same bytes), so a file's val and test views compare."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        for i in range(per_class):
            h, w = SIZES[(i + k) % len(SIZES)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[: h // 2, : w // 2, k % 3] = 250  # some structure: a class-coloured quarter
            for split in ("train", "val"):
                if split == "val" and not same_val:
                    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                d = root / split / f"c{k}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def training_batches(split, policy: str, seed: int = 3, epochs: int = 2, batch: int = 4) -> list:
    """The uint8 batches the training loop trains on (loader + the cifar batch crop where it applies)."""
    loader = make_loader(split, batch, shuffle=True, seed=seed, policy=policy, workers=0, pin_memory=False)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for images, labels in loader:
            kwargs = batch_augmentation(policy)
            if kwargs is not None and not loader.dataset.augments:
                images = augment_batch(images, g, **kwargs)
            out.append((images.clone(), labels.clone()))
    return out


# ----------------------------------------------------------------------------- item 2: memory == stream
@pytest.mark.parametrize("policy,size", [("cifar", 32), ("none", 32), ("imagenet", 32), ("imagenet", (24, 32))])
def test_memory_and_stream_train_on_identical_pixels(tmp_path, policy, size):
    root = write_textured_folder(tmp_path)
    mem = load_data(str(root), image_size=size, mode="memory", augment=policy)
    st = load_data(str(root), image_size=size, mode="stream", augment=policy)
    assert mem.mode == "memory" and st.mode == "stream" and mem.augment == st.augment == policy
    a, b = training_batches(mem.train, policy), training_batches(st.train, policy)
    assert len(a) == len(b) == 6
    want = (24, 32) if size == (24, 32) else (32, 32)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape[-2:] == want
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the two epochs differ (augmentation is live), so the equality above is not vacuous
    if policy != "none":
        assert not torch.equal(torch.cat([x for x, _ in a[:3]]), torch.cat([x for x, _ in a[3:]]))
    # the plain (non-augmented) view of the training split and the test split agree too
    for s in ("train", "test"):
        xs = [x for x, _ in make_loader(getattr(mem, s), 64, shuffle=False)]
        ys = [x for x, _ in make_loader(getattr(st, s), 64, shuffle=False, workers=0)]
        assert torch.equal(torch.cat(xs), torch.cat(ys))


def test_imagenet_store_is_the_evaluation_box(tmp_path):
    root = write_textured_folder(tmp_path, per_class=2)
    mem = load_data(str(root), image_size=32, mode="memory", augment="imagenet")
    st = load_data(str(root), image_size=32, mode="stream", augment="imagenet")
    # 32 / 0.875 = 36.57 -> a 37x37 source in memory and for every streamed file
    assert tuple(mem.train.source.shape) == (4, 3, 37, 37) and st.train.store == (37, 37)
    assert mem.input_size == st.input_size == (3, 32, 32)
    assert mem.view == st.view == EvalView((32, 32), 0.875, (37, 37))


# ----------------------------------------------------------------------------- item 4: fit_image
def test_fit_image_non_square_target_is_a_plain_downscale():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8, generator=g)
    img[:, :, :32] = 0  # the left quarter black: a centre crop of the width would lose it
    out = fit_image(img, (32, 64))
    assert out.shape == (3, 32, 64)
    assert torch.equal(out, TF.resize(img, [32, 64], antialias=True))
    assert int(out[:, :, :15].max()) == 0  # the black quarter is still the left quarter
    # cover, then centre-crop: 64x128 -> (32, 32) is a 2x downscale of the centre 64 columns
    assert torch.equal(fit_image(img, (32, 32)), TF.resize(img, [32, 64], antialias=True)[:, :, 16:48])
    # a square target is the shorter-side resize it always was
    assert torch.equal(fit_image(img, (16, 16)), TF.center_crop(TF.resize(img, [16], antialias=True), [16, 16]))


# ----------------------------------------------------------------------------- item 5: one evaluation view
def test_eval_view_by_policy():
    assert eval_view("imagenet", 224) == EvalView((224, 224), 0.875, (256, 256), "bilinear")
    assert eval_view("imagenet", (24, 32)) == EvalView((24, 32), 0.875, (27, 37))
    assert eval_view("cifar", 32) == EvalView((32, 32), 1.0, (32, 32))
    assert eval_view("none", (20, 30)).crop == 1.0
    # demo/CIFAR (every image 32x32): the native image is the source unless it is larger than the box
    assert eval_view("imagenet", 32, native=(32, 32)).store == (32, 32)
    assert eval_view("imagenet", 16, native=(32, 32)).store == (18, 18)  # 16 / 0.875 = 18.3


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_val_and_test_views_of_the_same_file_are_equal(tmp_path, mode):
    root = write_textured_folder(tmp_path)  # val/ holds the same files as train/, in the same order
    b = load_data(str(root), image_size=32, mode=mode, augment="imagenet")
    test = torch.cat([x for x, _ in make_loader(b.test, 64, shuffle=False, workers=0)])
    val = as_eval(subset(b.train, [0, 3, 7, 11]))
    got = torch.cat([x for x, _ in make_loader(val, 64, shuffle=False, workers=0)])
    assert torch.equal(got, test[[0, 3, 7, 11]])
    # and it is the view's apply() on the decoded file, with the 0.875 crop
    from compressor.data import decode_file
    from compressor.data.formats import quiet_torchvision

    f = sorted((root / "val" / "c0").iterdir())[3]
    with quiet_torchvision():
        img = decode_file(str(f), 3)
    assert torch.equal(b.view.apply(img), test[3])
    train_plain = torch.cat([x for x, _ in make_loader(b.train, 64, shuffle=False, workers=0)])
    assert not torch.equal(train_plain[[0, 3, 7, 11]], got)  # the training view is another one


def test_validation_split_of_a_run_uses_the_evaluation_view(tmp_path):
    from compressor.pipeline import prepare_splits

    root = write_textured_folder(tmp_path)
    b = load_data(str(root), image_size=32, mode="memory", augment="imagenet")
    cfg = types.SimpleNamespace(train_subset=0, val_fraction=0.5, seed=0)
    splits = prepare_splits(cfg, b)
    assert splits.eval_name == "val" and len(splits.eval) == 6
    for img in splits.eval.images:  # every validation image is bit-for-bit its file's test view
        assert any(torch.equal(img, t) for t in b.test.images)


def test_demo_under_imagenet_policy_gets_the_0875_crop():
    raw = load_data("demo", splits=("test",), augment="cifar").test.images[:5]
    b = load_data("demo", splits=("test",), augment="imagenet")
    assert b.augment == "imagenet" and b.test.images.shape == (1000, 3, 32, 32)
    from torchvision.transforms.v2 import functional as TF

    # by hand: 32 / 0.875 = 36.57 -> resize to 37x37, centre-crop 32 (offset round(2.5) = 2)
    want = TF.resize(raw, [37, 37], antialias=True)[:, :, 2:34, 2:34]
    assert torch.equal(b.test.images[:5], want)
    assert not torch.equal(b.test.images[:5], raw)
    assert b.view == EvalView((32, 32), 0.875, (32, 32))
    # a validation split cut from the demo training split gets the same view
    tr = load_data("demo", splits=("train",), augment="imagenet").train
    raw_tr = load_data("demo", splits=("train",), augment="cifar").train.images[:3]
    want_tr = TF.resize(raw_tr, [37, 37], antialias=True)[:, :, 2:34, 2:34]
    assert torch.equal(as_eval(subset(tr, [0, 1, 2])).images, want_tr)


# ----------------------------------------------------------------------------- data access by index
def test_spread_indices_round_robin_over_classes():
    labels = [c for c in range(10) for _ in range(50)]  # class-sorted, like an ImageFolder
    idx = spread_indices(labels, 100, seed=0)
    assert len(idx) == 100 == len(set(idx)) and idx == sorted(idx)
    assert Counter(labels[i] for i in idx) == {c: 10 for c in range(10)}
    assert spread_indices(labels, 100, seed=0) == idx  # deterministic
    assert spread_indices(labels, 100, seed=1) != idx  # seeded
    assert spread_indices(labels, 10_000, seed=0) == list(range(500))  # more than there are: all
    assert Counter(labels[i] for i in spread_indices(labels, 7, seed=0)).most_common(1)[0][1] == 1
    # a class that runs out is skipped: 1 image of class 0, the rest from class 1
    uneven = [0] + [1] * 50
    assert Counter(uneven[i] for i in spread_indices(uneven, 10, seed=3)) == {0: 1, 1: 9}
    assert spread_indices([], 5) == []


def test_load_sample_decodes_only_the_sample(tmp_path, monkeypatch):
    import compressor.data.memory as memory

    root = write_textured_folder(tmp_path, classes=4, per_class=6, same_val=False)
    calls = []
    real = memory.decode_file
    monkeypatch.setattr(memory, "decode_file", lambda path, channels=3: calls.append(path) or real(path, channels))
    s = load_sample(str(root), "test", 8, seed=5, image_size=32, augment="imagenet")
    assert len(calls) == 8 == s.decoded and len(s.test) == 8 and s.train is None
    assert Counter(s.test.labels.tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert s.indices == spread_indices([k for k in range(4) for _ in range(6)], 8, 5)
    assert s.view == eval_view("imagenet", 32) and s.class_names == ["c0", "c1", "c2", "c3"]
    monkeypatch.setattr(memory, "decode_file", real)
    # the same pixels as the whole split of load_data (either mode) at those positions
    for mode in ("memory", "stream"):
        full = load_data(str(root), image_size=32, mode=mode, augment="imagenet", splits=("test",)).test
        x = torch.cat([b for b, _ in make_loader(subset(full, s.indices), 64, shuffle=False, workers=0)])
        assert torch.equal(x, s.test.images)


def test_load_sample_of_the_demo_set():
    s = load_sample("demo", "test", 100, seed=0, augment="imagenet")
    assert len(s.test) == 100 and s.decoded == 0
    assert Counter(s.test.labels.tolist()) == {c: 10 for c in range(10)}
    full = load_data("demo", splits=("test",), augment="imagenet").test
    assert torch.equal(s.test.images, full.images[s.indices])
    tr = load_sample("demo", "train", 20, seed=1, augment="cifar")
    assert tr.train is not None and tr.test is None and tr.train.images.shape == (20, 3, 32, 32)
