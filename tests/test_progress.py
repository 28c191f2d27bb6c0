"""Progress without a terminal: lines inside long epochs (a cluster job's log is not silent for hours)."""
from __future__ import annotations

import pytest

from compressor import progress as progress_mod
from compressor.progress import Progress


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", c)
    return c


def _progress(lines: list, **kw) -> Progress:
    return Progress(enabled=True, print_fn=lambda msg, **_: lines.append(msg), bar=False, **kw)


def test_a_long_epoch_logs_images_rate_and_eta_at_most_every_interval(clock):
    lines: list[str] = []
    p = _progress(lines, log_every_s=120.0)
    p.start_stage("stage 1/2 resnet14", 3, 1000)
    p.start_epoch(0, 3)
    clock.t = 1100.0
    p.update(100, loss=2.5)          # 100 s: under the interval, nothing
    assert lines == []
    clock.t = 1200.0
    p.update(300)                    # 200 s, 400 images: 2 img/s, 600 left: 300 s
    assert lines == ["  stage 1/2 resnet14 epoch 1/3: 400/1,000 images (40%) | loss 2.5000 | 2.0 img/s | "
                     "epoch ETA 300s"]
    clock.t = 1250.0
    p.update(100, loss=1.5)          # 50 s after the last line: nothing
    assert len(lines) == 1
    clock.t = 1330.0
    p.update(100)                    # 130 s after it: 600 images in 330 s
    assert lines[-1] == ("  stage 1/2 resnet14 epoch 1/3: 600/1,000 images (60%) | loss 2.4000 | 1.8 img/s | "
                         "epoch ETA 220s")
    clock.t = 1600.0
    p.update(400)                    # the epoch is complete: its epoch line says the rest
    assert len(lines) == 2


def test_short_epochs_print_only_their_epoch_line(clock):
    lines: list[str] = []
    p = _progress(lines)
    p.start_stage("resnet8", 2, 64)
    p.start_epoch(0, 2)
    for _ in range(4):
        clock.t += 10
        p.update(16)
    p.end_epoch({"epoch": 1, "train_loss": 2.0, "train_top1": 30.0, "val_top1": 31.5, "seconds": 40.0})
    assert lines == ["  resnet8 epoch 1/2 | loss 2.0000 | train 30.00% | val 31.50% | 40.0s | ETA 40s"]


def test_processes_and_a_mid_epoch_resume_count_every_process_and_rate_only_new_images(clock):
    lines: list[str] = []
    p = _progress(lines, log_every_s=60.0, processes=2)
    p.start_stage("resnet8", 1, 1000)  # the sampler's length: all processes' images
    p.start_epoch(0, 1)
    p.resumed_in_epoch(250)               # this process had done 250 of its 500
    clock.t += 100
    p.update(50)                          # 2 x 50 new images in 100 s
    assert lines == ["  resnet8 epoch 1/1: 600/1,000 images (60%) | 1.0 img/s | epoch ETA 400s"]


def test_a_terminal_gets_the_bar_not_the_lines(clock):
    lines: list[str] = []
    p = _progress(lines, log_every_s=0.0)
    p.use_bar = True
    p.start_stage("resnet8", 1, 100)
    p.start_epoch(0, 1)
    clock.t += 500
    p.update(10)
    p.close()
    assert lines == []


def test_disabled_progress_prints_nothing(clock):
    lines: list[str] = []
    p = Progress(enabled=False, print_fn=lambda msg, **_: lines.append(msg), bar=False, log_every_s=0.0)
    p.start_stage("resnet8", 1, 100)
    p.start_epoch(0, 1)
    clock.t += 500
    p.update(10)
    assert lines == []


def test_the_stage_eta_after_a_mid_epoch_resume_counts_only_the_share_trained_here(clock):
    lines: list[str] = []
    p = _progress(lines)
    p.start_stage("mobilenetv2_100", 30, 1000)
    p.start_epoch(1, 30)
    p.resumed_in_epoch(800)               # resumed after 80 % of epoch 2: 200 images left
    clock.t += 20.0
    p.update(200)
    p.end_epoch({"epoch": 2, "train_loss": 1.2, "train_top1": 56.0, "seconds": 20.0})
    # 20 s for 0.2 of an epoch: 100 s an epoch, 28 left -> 2800 s (560 s if the share counted as one)
    assert lines[-1] == "  mobilenetv2_100 epoch 2/30 | loss 1.2000 | train 56.00% | 20.0s | ETA 2800s"
    p.start_epoch(2, 30)
    clock.t += 100.0
    p.update(1000)
    p.end_epoch({"epoch": 3, "train_loss": 1.1, "train_top1": 60.0, "seconds": 100.0})
    assert lines[-1].endswith("| 100.0s | ETA 2700s")   # 120 s for 1.2 epochs, 27 left


def test_a_resume_at_the_very_end_of_an_epoch_prints_no_stage_eta_until_one_is_measured(clock):
    lines: list[str] = []
    p = _progress(lines)
    p.start_stage("resnet8", 3, 100)
    p.start_epoch(0, 3)
    p.resumed_in_epoch(100)
    clock.t += 1.0
    p.end_epoch({"epoch": 1, "train_loss": 2.0, "train_top1": 30.0, "seconds": 1.0})
    assert lines == ["  resnet8 epoch 1/3 | loss 2.0000 | train 30.00% | 1.0s"]


def test_a_resumed_stage_starts_the_bar_at_its_epoch_and_images_and_rates_only_new_ones(clock):
    p = Progress(enabled=True, print_fn=lambda *a, **k: None, bar=True, processes=2)
    p.start_stage("mobilenetv2_100", 30, 1000)
    p.start_epoch(1, 30)                  # resumed in epoch 2: epoch 1's 1,000 images are behind it
    assert (p.bar.n, p.bar.initial, p.bar.total) == (1000, 1000, 30_000)
    p.resumed_in_epoch(400)               # 400 per process of epoch 2 done before the resume
    assert (p.bar.n, p.bar.initial) == (1800, 1800)
    p.update(100)                         # new images move the bar and count in tqdm's rate
    assert (p.bar.n, p.bar.initial) == (2000, 1800)
    p.start_epoch(2, 30)                  # an epoch boundary reached by training: nothing skipped
    assert (p.bar.n, p.bar.initial) == (2000, 1800)
    p.close()
