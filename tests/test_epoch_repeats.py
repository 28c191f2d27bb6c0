"""``epoch_repeats``: several passes over a small training set make one epoch (issue 18)."""
from __future__ import annotations

import math

import torch

from compressor.config import TrainConfig, resolve_config
from compressor.data import EpochSampler, make_loader, synthetic_data


def test_one_pass_is_the_plain_epoch_permutation():
    # the order runs had before epoch_repeats existed: randperm seeded by seed * 1_000_003 + epoch
    for epoch in (0, 5):
        s = EpochSampler(10, shuffle=True, seed=3)
        s.set_epoch(epoch)
        want = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch)).tolist()
        assert list(s) == want and len(s) == 10


def test_repeats_visit_every_index_once_per_pass_with_a_new_order():
    s = EpochSampler(7, shuffle=True, seed=1, repeats=3)
    s.set_epoch(2)
    order = list(s)
    assert len(s) == len(order) == 21
    passes = [order[k * 7:(k + 1) * 7] for k in range(3)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3  # each pass shuffled anew
    # pass k of epoch e is the one-pass permutation of "epoch" e * repeats + k: no pass repeats across epochs
    one = EpochSampler(7, shuffle=True, seed=1)
    one.set_epoch(2 * 3 + 1)
    assert passes[1] == list(one)
    s.set_epoch(3)
    assert list(s)[:7] != passes[0]
    # per-sample augmentation is seeded by the pass, so a repeated image gets another crop
    tagged = EpochSampler(4, shuffle=False, seed=0, with_epoch=True, repeats=2)
    tagged.set_epoch(1)
    assert list(tagged) == [(2, 0), (2, 1), (2, 2), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]


def test_the_loader_takes_the_repeats():
    data = synthetic_data(num_classes=3, n_train=10, n_test=2)
    loader = make_loader(data.train, 4, shuffle=True, seed=0, repeats=3)
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(30 / 4)
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.bincount(minlength=3), data.train.labels.bincount(minlength=3) * 3)


def test_a_small_set_trains_with_repeated_passes_and_records_them(tmp_path, monkeypatch, one_torch_thread):
    from compressor import pipeline

    monkeypatch.setenv("COMPRESS_EPOCH_MIN_IMAGES", "64")
    seen = {}
    real_fit = pipeline.fit

    def spy_fit(accelerator, model, guides, train_loader, *args, **kwargs):
        seen["steps"] = len(train_loader)
        return real_fit(accelerator, model, guides, train_loader, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", spy_fit)
    cfg = resolve_config(TrainConfig, None, {"arch": "resnet8", "out": str(tmp_path / "m.safetensors"),
                                             "epochs": 1, "mixed_precision": "no"})
    rec = pipeline.train_model(cfg, show_progress=False,
                               data=synthetic_data(num_classes=4, n_train=32, n_test=8))["training_defaults"]
    # 32 images less the 10 % validation hold-out = 29; 64 / 29 -> 3 passes = 87 images = 6 steps of 16
    assert (rec["epoch_repeats"], rec["batch_size"]) == (3, 16)
    assert rec["epoch_repeats_rule"] == "auto: 3, so that an epoch of 29 training images is at least 64 images"
    assert seen["steps"] == math.ceil(29 * 3 / 16) == 6
