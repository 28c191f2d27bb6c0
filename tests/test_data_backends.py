"""The two data backends on a generated mixed folder: formats, bad files, order, determinism, fingerprints."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import (FileSplit, ImageSplit, channel_stats, choose_mode, decode_file, fit_image, load_data,
                             make_loader)
from compressor.data.formats import quiet_torchvision
from compressor.errors import CompressError

from data_folders import write_mixed_folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_folder(tmp_path_factory.mktemp("mixed") / "ds")


def test_bad_file_report_lists_both(mixed):
    for mode in ("memory", "stream"):
        with pytest.raises(CompressError, match="cannot decode image files") as e:
            load_data(str(mixed), image_size=32, mode=mode)
        msg = str(e.value)
        assert "(2 of 38)" in msg and "red/broken.jpg" in msg and "blue/broken.png" in msg
        assert "--skip-bad-images" in msg and "\n" not in msg


def test_mixed_folder_loads_in_both_modes(mixed):
    mem = load_data(str(mixed), image_size=32, mode="memory", skip_bad_images=True)
    st = load_data(str(mixed), image_size=32, mode="stream", skip_bad_images=True)
    assert mem.mode == "memory" and st.mode == "stream" and mem.skipped == st.skipped == 2
    assert isinstance(mem.train, ImageSplit) and isinstance(st.train, FileSplit)
    assert mem.input_size == st.input_size == (3, 32, 32)  # colour images present -> 3 channels
    assert len(mem.train) == len(st.train) == 18 and len(mem.test) == 18
    # the same pixels from both backends (no augmentation on the test split)
    streamed = torch.cat([x for x, _ in make_loader(st.test, 7, shuffle=False, workers=0)])
    assert torch.equal(streamed, mem.test.images)
    # every format decodes to its class colour: red images have R >> B, blue the reverse
    means = mem.test.images.float().mean((2, 3))
    for img_mean, label, name in zip(means, mem.test.labels.tolist(), sorted(os.listdir(mixed / "val" / "blue")) * 2):
        r, b = float(img_mean[0]), float(img_mean[2])
        if name in ("c_gray16.png", "g_gray.jpg"):  # grayscale files: repeated to three equal channels
            assert r == b == float(img_mean[1]), name
            continue
        assert (b > r + 100) if label == 0 else (r > b + 100), (name, label, r, b)


def test_decode_formats(mixed):
    with quiet_torchvision():
        _check_formats(mixed / "train" / "red")


def _check_formats(d):
    g16 = decode_file(str(d / "c_gray16.png"), 1)
    assert g16.shape == (1, 64, 48)[:1] + (48, 64) and g16.dtype == torch.uint8 and int(g16[0, 0, 0]) == 0x80
    assert torch.equal(decode_file(str(d / "c_gray16.png"), 3), g16.expand(3, -1, -1))
    for name in ("d_palette.png", "e_rgba.png", "f_cmyk.jpg", "h_rgb.bmp", "i_rgb.webp"):
        x = decode_file(str(d / name), 3)
        assert x.shape[0] == 3 and x.dtype == torch.uint8, name
        assert float(x[0].float().mean()) > 180 and float(x[2].float().mean()) < 80, name
    gray = decode_file(str(d / "a_rgb.jpg"), 1)  # RGB -> luminance when 1 channel is asked for
    assert gray.shape[0] == 1 and 60 < float(gray.float().mean()) < 90  # 0.299*230 + 0.587*20 + 0.114*20


def test_grayscale_folder_is_one_channel(tmp_path):
    for split in ("train", "val"):
        for k, v in enumerate((40, 200)):
            p = tmp_path / split / f"c{k}"
            p.mkdir(parents=True)
            Image.new("L", (28, 28), v).save(p / "0.png")
            Image.fromarray(np.full((28, 28), v * 256, dtype=np.uint16)).save(p / "1.png")
    b = load_data(str(tmp_path))
    assert b.input_size == (1, 28, 28)
    assert b.train.images[:, 0, 0, 0].tolist() == [40, 40, 200, 200]
    assert any("every image is grayscale" in n for n in b.notes) and any("native size" in n for n in b.notes)


def test_same_order_in_both_modes_and_across_workers(mixed):
    mem = load_data(str(mixed), image_size=24, mode="memory", skip_bad_images=True)
    st = load_data(str(mixed), image_size=24, mode="stream", skip_bad_images=True)
    for epoch in (0, 3):
        loaders = [make_loader(mem.train, 5, shuffle=True, seed=11)]
        loaders += [make_loader(st.train, 5, shuffle=True, seed=11, workers=w) for w in (0, 1, 2)]
        runs = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            runs.append([(x, y) for x, y in loader])
        for other in runs[1:]:  # cifar policy: batches are plain fitted images, augmented later by the trainer
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], other))
    assert not torch.equal(runs[0][0][1], mem.train.labels[:5])  # really shuffled


def test_stream_imagenet_batches_identical_across_workers_and_resume(mixed):
    st = load_data(str(mixed), image_size=24, mode="stream", augment="imagenet", skip_bad_images=True)
    assert st.augment == "imagenet" and st.test.crop == 0.875

    def epoch_batches(workers, epoch, skip=0):
        loader = make_loader(st.train, 4, shuffle=True, seed=5, policy="imagenet", workers=workers)
        assert loader.dataset.augments
        loader.sampler.set_epoch(epoch)
        return [b for k, b in enumerate(loader) if k >= skip]

    ref = epoch_batches(0, 1)
    for w in (1, 2):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, epoch_batches(w, 1)))
    resumed = epoch_batches(2, 1, skip=2)  # a fresh loader (a new process after a kill) continuing at step 2
    assert len(resumed) == len(ref) - 2 and all(torch.equal(a[0], b[0]) for a, b in zip(ref[2:], resumed))
    other_epoch = epoch_batches(0, 2)
    assert not torch.equal(ref[0][0], other_epoch[0][0])  # new crops (and order) every epoch


def test_fit_image_imagenet_eval_crop_by_hand():
    img = torch.arange(64 * 64, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 64, 64)
    # size 56 / 0.875 = 64: no resize, center crop 56 -> rows/cols 4..59
    assert torch.equal(fit_image(img, (56, 56), 0.875), img[:, 4:60, 4:60])
    assert fit_image(img, (32, 32)).shape == (1, 32, 32)


def test_fingerprints_see_one_changed_image(tmp_path):
    root = write_mixed_folder(tmp_path / "ds", broken=False)
    a_mem = load_data(str(root), image_size=16, mode="memory")
    a_st = load_data(str(root), image_size=16, mode="stream")
    assert a_mem.train.fingerprint() == load_data(str(root), image_size=16, mode="memory").train.fingerprint()
    a_st_print = a_st.train.fingerprint()  # from the files' sizes and mtimes as they are now
    target = root / "train" / "red" / "b_rgb.png"
    Image.new("RGB", (120, 90), (200, 40, 40)).save(target)  # same file name, count and label
    os.utime(target, ns=(1, 1))
    b_mem = load_data(str(root), image_size=16, mode="memory")
    b_st = load_data(str(root), image_size=16, mode="stream")
    assert b_mem.train.fingerprint() != a_mem.train.fingerprint()
    assert b_st.train.fingerprint() != a_st_print
    assert load_data(str(root), image_size=20, mode="stream").train.fingerprint() != b_st.train.fingerprint()
    assert a_mem.test.fingerprint() == b_mem.test.fingerprint()


def test_auto_mode_budget(monkeypatch):
    import compressor.data.load as load

    monkeypatch.setattr(load, "available_memory", lambda: 8_000_000_000)
    assert choose_mode("auto", 3_000_000_000, processes=1)[0] == "memory"
    mode, why = choose_mode("auto", 3_000_000_000, processes=2)  # budget 0.5 * 8 GB / 2 = 2 GB
    assert mode == "stream" and "2,000 MB" in why and "2 processes" in why
    assert choose_mode("memory", 10**13)[0] == "memory"
    with pytest.raises(CompressError, match="data-mode"):
        choose_mode("disk", 1)


def test_channel_stats_by_hand():
    images = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    images[2:, 0] = 255  # channel 0: half 0, half 255 -> mean 0.5, std 0.5; channel 1: all 0
    mean, std = channel_stats(ImageSplit(images, torch.zeros(4, dtype=torch.int64)), n=10)
    assert mean == [0.5, 0.0] and std == [0.5, 0.001]


def test_eval_reads_only_the_test_split(tmp_path):
    root = write_mixed_folder(tmp_path / "ds", broken=True)  # the broken files are in train/
    b = load_data(str(root), image_size=20, splits=("test",))
    assert b.train is None and len(b.test) == 18 and b.input_size == (3, 20, 20)


def test_stream_shards_are_disjoint_per_process(mixed, monkeypatch):
    """Under Accelerate with 2 processes each process decodes only its own batches, and together all."""
    from accelerate.data_loader import prepare_data_loader

    from compressor.data.stream import StreamDataset

    st = load_data(str(mixed), image_size=16, mode="stream", skip_bad_images=True)
    decoded: list[int] = []
    original = StreamDataset._one
    monkeypatch.setattr(StreamDataset, "_one", lambda self, key: (decoded.append(key), original(self, key))[1])
    per_process = []
    for rank in (0, 1):
        decoded.clear()
        loader = prepare_data_loader(make_loader(st.train, 3, shuffle=True, seed=2, workers=0),
                                     num_processes=2, process_index=rank, put_on_device=False)
        loader.set_epoch(1)
        labels = torch.cat([y for _, y in loader])
        per_process.append(list(decoded))
        assert labels.tolist() == st.train.labels[decoded].tolist()
    assert len(per_process[0]) == len(per_process[1]) == 9  # 18 images, 6 batches of 3, 3 per process
    assert set(per_process[0]).isdisjoint(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(18))


def test_stream_pixel_failure_is_one_line_from_a_worker(tmp_path):
    import io

    for split in ("train", "val"):
        for k in range(2):
            d = tmp_path / split / f"c{k}"
            d.mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 200, 30)).save(d / "ok.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "train" / "c1" / "cut.png").write_bytes(buf.getvalue()[:300])  # header intact, pixels cut
    b = load_data(str(tmp_path), mode="stream")  # headers only: passes
    with pytest.raises(CompressError) as e:
        list(make_loader(b.train, 4, shuffle=False, workers=1))
    assert "cut.png" in str(e.value) and "\n" not in str(e.value) and "pixels do not" in str(e.value)



def test_mid_epoch_resume_in_stream_mode_decodes_only_the_remaining_batches(mixed, monkeypatch):
    """The trainer skips finished steps in the batch sampler: a streamed split decodes nothing for them,
    and the remaining steps keep their numbers (they seed augmentation and guide dropping)."""
    from compressor.config import OptimConfig
    from compressor.data.stream import StreamDataset
    from compressor.guides import GuideSet
    from compressor.models import create_model
    from compressor.pipeline import make_accelerator
    from compressor.trainer import LossSettings, train_one_epoch

    st = load_data(str(mixed), image_size=24, mode="stream", augment="imagenet", skip_bad_images=True)
    cfg = OptimConfig(mixed_precision="no", channels_last=False, augment="imagenet", lr=0.01)
    accelerator = make_accelerator(cfg)
    decoded = []
    real_one = StreamDataset._one
    monkeypatch.setattr(StreamDataset, "_one", lambda self, key: decoded.append(key) or real_one(self, key))
    loader = make_loader(st.train, 4, shuffle=True, seed=5, policy="imagenet", workers=0)
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=st.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loader.set_epoch(1)
    steps = len(loader)
    assert steps >= 3
    out = train_one_epoch(accelerator, model, GuideSet([]), loader, optimizer, cfg=cfg, loss_cfg=LossSettings(),
                          mean=[0.5] * 3, std=[0.25] * 3, epoch=1, stage_seed=3, start_step=2,
                          partial={"sums": {"loss": 0.0, "ce": 0.0, "kd": 0.0}, "correct": 0.0, "seen": 8})
    remaining = len(st.train) - 2 * 4
    assert len(decoded) == remaining  # nothing decoded for steps 1 and 2
    assert out["steps"] == steps
