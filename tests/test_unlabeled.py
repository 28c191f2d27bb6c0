"""``compress distill --unlabeled DIR``: the guides label unlabeled images, the student learns their KD terms."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from compressor.config import DistillConfig, OptimConfig, resolve_config
from compressor.data import load_data
from compressor.data.unlabeled import (UnlabeledStream, list_unlabeled, load_unlabeled, unlabeled_batch_size,
                                       unlabeled_positions)
from compressor.errors import CompressError
from compressor.guides import GuideSet
from compressor.losses import guides_kd_loss as unlabeled_kd_loss
from compressor.trainer import LossSettings, train_one_epoch

from conftest import run_cli_inprocess

# KL(p_g || p_s) with p_s uniform over 3 classes and p_g = softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4):
# 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8)
KL_ROW = 0.5 * math.log(9 / 8)  # 0.058891517...


def _png_folder(root: Path, n: int, *, start: int = 0, nested: bool = False) -> Path:
    """``n`` demo test images as PNG files under ``root`` (flat, or spread over two sub-folders)."""
    from PIL import Image

    images = load_data("demo", splits=("test",)).test.images
    for i in range(n):
        folder = root / (f"part{i % 2}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[start + i].permute(1, 2, 0).numpy()).save(folder / f"img{i:03d}.png")
    return root


# ---------------------------------------------------------------- the loss
def test_unlabeled_kd_loss_is_the_kd_term_alone_hand_computed():
    student = torch.zeros(2, 3)
    guide = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2 equals the student: KL 0
    got = unlabeled_kd_loss(student, [guide], temperature=1.0)
    assert got.item() == pytest.approx(KL_ROW / 2, abs=1e-6)  # batchmean over the 2 rows
    # T = 2 with the guide's logits doubled: the same distributions, T² = 4 times the KL
    got_t2 = unlabeled_kd_loss(student, [2 * guide], temperature=2.0)
    assert got_t2.item() == pytest.approx(4 * KL_ROW / 2, abs=1e-6)
    # two guides (the second equal to the student): summed, or averaged with reduction "mean"
    assert unlabeled_kd_loss(student, [guide, student], temperature=1.0).item() == pytest.approx(KL_ROW / 2, abs=1e-6)
    assert unlabeled_kd_loss(student, [guide, student], temperature=1.0,
                             reduction="mean").item() == pytest.approx(KL_ROW / 4, abs=1e-6)
    assert unlabeled_kd_loss(student, [], temperature=1.0).item() == 0.0


def test_the_step_loss_is_a_per_image_mean_over_labelled_and_unlabeled_images():
    from compressor.losses import with_unlabeled

    # 4 labelled images at loss 2.0, 6 unlabeled at KD 1.0, λ 0.5: (4·2 + 6·0.5·1) / 10 = 1.1
    got = with_unlabeled(torch.tensor(2.0), torch.tensor(1.0), n_labelled=4, n_unlabeled=6, kd_weight=0.5)
    assert got.item() == pytest.approx(1.1)
    # not the labelled loss plus λ·KD (2.5), and λ 0 leaves the labelled mean diluted by U: 8 / 10
    assert with_unlabeled(torch.tensor(2.0), torch.tensor(1.0), n_labelled=4, n_unlabeled=6,
                          kd_weight=0.0).item() == pytest.approx(0.8)
    # gradients reach both terms with the per-image weights
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    with_unlabeled(a, b, n_labelled=4, n_unlabeled=6, kd_weight=0.5).backward()
    assert (a.grad.item(), b.grad.item()) == (pytest.approx(0.4), pytest.approx(0.3))


class _Fixed(nn.Module):
    """A guide that answers ``[ln 2, 0, 0]`` for every image."""

    def forward(self, x):
        return torch.tensor([math.log(2.0), 0.0, 0.0]).expand(x.shape[0], 3).clone()


class _ZeroLinear(nn.Module):
    """A student whose logits start at zero (uniform) for every image."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(features, 3)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_training_step_adds_the_hand_computed_kd_term_of_the_unlabeled_batch():
    """λ=0.5, one step, lr 0, 4 labelled and 5 unlabeled images: the step's loss is the mean over all 9
    images, (4·(0.5·CE + 0.5·KD) + 5·0.5·KD_unlabeled) / 9, with CE = ln 3 (the student starts uniform) and
    both KD terms the hand-computed value; the unlabeled labels (-1, which cross-entropy would reject) are
    never read."""
    from accelerate import Accelerator

    from compressor.data import ImageSplit, make_loader
    from compressor.data.unlabeled import UnlabeledSet

    g = torch.Generator().manual_seed(0)
    labelled = ImageSplit(torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8, generator=g),
                          torch.tensor([0, 1, 2, 0]))
    unl_split = ImageSplit(torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g),
                           torch.full((6,), -1, dtype=torch.int64))
    stream = UnlabeledStream(UnlabeledSet("x", unl_split, "memory"), 5, seed=1, policy="none")
    accelerator = Accelerator(cpu=True)
    model = _ZeroLinear(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = OptimConfig(lr=0.0, augment="none", schedule="constant", warmup_epochs=0, label_smoothing=0.0)
    loader = make_loader(labelled, 4, shuffle=True, seed=0)
    out = train_one_epoch(accelerator, model, GuideSet([_Fixed()]), loader, optimizer, cfg=cfg,
                          loss_cfg=LossSettings(temperature=1.0, kd_weight=0.5), mean=[0.5], std=[0.25], epoch=0,
                          stage_seed=0, unlabeled=stream)
    labelled_loss = 0.5 * math.log(3.0) + 0.5 * KL_ROW
    assert out["train_kd"] == pytest.approx(KL_ROW, abs=1e-6)
    assert out["train_kd_unlabeled"] == pytest.approx(KL_ROW, abs=1e-6)
    assert out["train_loss"] == pytest.approx((4 * labelled_loss + 5 * 0.5 * KL_ROW) / 9, abs=1e-6)
    # without unlabeled images the loss is the labelled batch's and no unlabeled term is reported
    plain = train_one_epoch(accelerator, model, GuideSet([_Fixed()]), loader, optimizer, cfg=cfg,
                            loss_cfg=LossSettings(temperature=1.0, kd_weight=0.5), mean=[0.5], std=[0.25], epoch=0,
                            stage_seed=0)
    assert plain["train_loss"] == pytest.approx(labelled_loss, abs=1e-6) and "train_kd_unlabeled" not in plain


# ---------------------------------------------------------------- the order
def test_unlabeled_order_is_a_pure_function_that_walks_every_image_once_per_pass_and_shards_by_rank():
    n, batch, steps = 10, 4, 2
    perm0 = torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + 0)).tolist()
    perm1 = torch.randperm(n, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1)).tolist()
    at = lambda e, s, **kw: unlabeled_positions(n, batch, seed=7, epoch=e, step=s, steps_per_epoch=steps, **kw)
    assert at(0, 0) == perm0[0:4] and at(0, 1) == perm0[4:8]
    assert at(1, 0) == perm0[8:10] + perm1[0:2]  # epoch 1 goes on where epoch 0 stopped, then a new pass
    assert at(1, 0) == at(1, 0)  # a pure function: a resumed step gets the same batch
    # two processes: global batch g = (epoch*steps + step)*world + rank, disjoint shards
    r0, r1 = at(0, 0, rank=0, world=2), at(0, 0, rank=1, world=2)
    assert r0 == perm0[0:4] and r1 == perm0[4:8] and not set(r0) & set(r1)
    assert unlabeled_batch_size(128, 1.0) == 128 and unlabeled_batch_size(128, 0.25) == 32
    assert unlabeled_batch_size(3, 0.1) == 1


# ---------------------------------------------------------------- the folder
def test_folders_flat_nested_and_imagefolder_roots(tmp_path):
    flat = _png_folder(tmp_path / "flat", 3)
    assert len(list_unlabeled(flat)[1]) == 3
    nested = _png_folder(tmp_path / "nested", 4, nested=True)
    assert len(list_unlabeled(nested)[1]) == 4
    root = tmp_path / "imagefolder"
    _png_folder(root / "train" / "cat", 2)
    _png_folder(root / "test" / "cat", 5)
    folder, files = list_unlabeled(root)  # an ImageFolder root: train/ only, its test images never train
    assert folder == root / "train" and len(files) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile.png").write_bytes(b"x")
    for bad, words in [(tmp_path / "empty", "has no images"), (tmp_path / "missing", "does not exist"),
                       (tmp_path / "afile.png", "is a file")]:
        with pytest.raises(CompressError, match=words):
            list_unlabeled(bad)


def test_images_take_the_labelled_size_and_channels_in_either_backend(tmp_path):
    folder = _png_folder(tmp_path / "u", 5)
    memory = load_unlabeled(folder, input_size=(1, 16, 16), policy="cifar", mode="memory")
    stream = load_unlabeled(folder, input_size=(1, 16, 16), policy="cifar", mode="stream")
    assert memory.mode == "memory" and stream.mode == "stream" and len(memory) == len(stream) == 5
    assert memory.split.input_size == stream.split.input_size == (1, 16, 16)
    assert memory.split.labels.tolist() == [-1] * 5  # placeholders, never read
    batches = [next(UnlabeledStream(u, 3, seed=4, policy="cifar", workers=0).epoch(0, steps=1))
               for u in (memory, stream)]
    assert batches[0].dtype == torch.uint8 and batches[0].shape == (3, 1, 16, 16)
    assert torch.equal(batches[0], batches[1])  # the same pixels from both backends
    record = memory.record()
    assert record["images"] == 5 and record["folder"] == str(folder) and len(record["fingerprint"]) == 64
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(CompressError, match="broken.png"):
        load_unlabeled(folder, input_size=(3, 32, 32), policy="cifar", mode="memory")
    assert len(load_unlabeled(folder, input_size=(3, 32, 32), policy="cifar", skip_bad_images=True,
                              mode="memory")) == 5


# ---------------------------------------------------------------- the command
def test_method_ce_is_refused_with_one_line(tmp_path, pretrained_teacher, capsys):
    folder = _png_folder(tmp_path / "u", 2)
    with pytest.raises(CompressError, match="method ce"):
        resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8", method="ce",
                                                 unlabeled=str(folder)))
    with pytest.raises(CompressError, match="unlabeled_ratio"):
        resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8",
                                                 unlabeled=str(folder), unlabeled_ratio=0.0))
    code, _, err = run_cli_inprocess(["distill", "--teacher", pretrained_teacher, "--target", "resnet8",
                                      "--method", "ce", "--unlabeled", folder, "--out", tmp_path / "run"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "--unlabeled" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


TINY = ["--method", "kd", "--data", "demo", "--train-subset", "64", "--batch-size", "32", "--epochs", "1",
        "--latency-backend", "none", "--seed", "3", "--bn-recalibration-batches", "1", "--val-fraction", "0.02"]


def _student(run: Path) -> dict:
    return load_file(str(run / "student.safetensors"))


def test_distill_with_unlabeled_records_it_streams_caches_and_refuses_a_changed_set_on_resume(
        tmp_path, pretrained_teacher, capsys, monkeypatch, one_torch_thread):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    # the auto T counts the unlabeled images the stage takes: with the bound just above the ~63
    # labelled images seen, the unlabeled ones (half as many: ratio 0.5) make it a long run (T 4)
    from compressor import training_defaults
    monkeypatch.setattr(training_defaults, "AUTO_T_LONG_IMAGES", 70)
    folder = _png_folder(tmp_path / "unlabeled", 24, start=100)  # flat: no class folders, no labels
    args = ["distill", "--teacher", pretrained_teacher, "--target", "resnet8", *TINY, "--unlabeled", folder,
            "--unlabeled-ratio", "0.5", "--data-workers", "0"]

    code, out, err = run_cli_inprocess([*args, "--cache-guides", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    rec = summary["unlabeled"]
    assert rec["folder"] == str(folder) and rec["images"] == 24 and rec["ratio"] == 0.5 and rec["batch_size"] == 16
    assert rec["data_mode"] == "memory" and len(rec["fingerprint"]) == 64
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["unlabeled"] == str(folder) and cfg["unlabeled_ratio"] == 0.5
    assert cfg["unlabeled_data"]["fingerprint"] == rec["fingerprint"]
    seen, unl = (int(x.replace(",", "")) for x in
                 re.fullmatch(r"auto: 4, ([\d,]+) training images seen by the student's stage, ([\d,]+) of them "
                              r"unlabeled \(from 70 on\)", cfg["temperature_rule"]).groups())
    labelled = seen - unl
    assert labelled < 70 <= seen and unl == labelled // 2 and summary["temperature"] == 4.0
    metrics = [json.loads(x) for x in (run / "stages/1-resnet8/metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["steps"] == 2 and metrics[0]["train_kd_unlabeled"] > 0
    assert metrics[0]["unlabeled_cache_hits_misses"] == [[0, 2]]  # filled: one miss per step
    assert "each step also takes 16 of the 24 unlabeled images" in out

    # a second run hits the unlabeled cache too and trains the same student
    assert run_cli_inprocess([*args, "--cache-guides", "--out", tmp_path / "b"], capsys)[0] == 0
    metrics_b = [json.loads(x) for x in (tmp_path / "b/stages/1-resnet8/metrics.jsonl").read_text().splitlines()]
    assert metrics_b[0]["unlabeled_cache_hits_misses"] == [[2, 0]]
    a = _student(run)
    assert all(torch.equal(a[k], v) for k, v in _student(tmp_path / "b").items())

    # streamed (decoded by the loader, not held in memory): the same batches, the same student. Its own
    # empty cache: the guides run on the streamed pixels, their logits rounded as the cache stores them
    # (float16) as in run a -- without a cache the float32 logits train a student 1e-5 away where the
    # guides run in float32 (no bf16 autocast: a CPU without AVX512-BF16/AMX)
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache-stream"))
    code, _, err = run_cli_inprocess([*args, "--cache-guides", "--data-mode", "stream", "--out", tmp_path / "c"],
                                     capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "c/summary.json").read_text())["unlabeled"]["data_mode"] == "stream"
    metrics_c = [json.loads(x) for x in (tmp_path / "c/stages/1-resnet8/metrics.jsonl").read_text().splitlines()]
    assert metrics_c[0]["unlabeled_cache_hits_misses"] == [[0, 2]]  # the guides ran on the streamed images
    assert all(torch.equal(a[k], v) for k, v in _student(tmp_path / "c").items())

    # without --unlabeled the student differs (the unlabeled batches did train it)
    assert run_cli_inprocess(["distill", "--teacher", pretrained_teacher, "--target", "resnet8", *TINY,
                              "--no-kd-mixup", "--out", tmp_path / "d"], capsys)[0] == 0
    summary_d = json.loads((tmp_path / "d/summary.json").read_text())
    assert summary_d["unlabeled"] is None and summary_d["temperature"] == 2.0  # the labelled images alone: short
    assert not all(torch.equal(a[k], v) for k, v in _student(tmp_path / "d").items())

    # resuming with other unlabeled images is refused with one line
    (folder / "img000.png").unlink()
    code, _, err = run_cli_inprocess([*args, "--cache-guides", "--out", tmp_path / "a", "--resume"], capsys)
    assert code == 2 and "unlabeled_data" in err and len(err.strip().splitlines()) == 1
