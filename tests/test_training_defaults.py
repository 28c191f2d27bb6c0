"""Per-family training defaults (issue 18, part 1): resolution, printing, the schedule, label
smoothing, gradient clipping, paper recipes pinned, and resume of runs written before them."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from compressor.config import DistillConfig, TrainConfig, config_to_dict, resolve_config
from compressor.errors import CompressError
from compressor.losses import dgkd_loss
from compressor.models import list_families
from compressor.training_defaults import (DEFAULTED, FALLBACK, FAMILY_DEFAULTS, LEGACY, describe, inherit_recorded,
                                          keep_recorded_defaults, resolve_training_defaults)
from compressor.trainer import lr_at_epoch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PAPER_RECIPES = sorted([*RECIPES.glob("cifar*.yaml"), RECIPES / "cpu_study.yaml", *RECIPES.glob("imagenet_*.yaml")])


def _train(**kw):
    return TrainConfig(arch="x", out="y.safetensors", **kw)


def test_a_teacher_trains_without_label_smoothing_whatever_its_family():
    """compress train makes teachers: smoothed teachers teach less (docs/results.md §6), so its label
    smoothing defaults to 0 for every family; a flag still sets it; a chain model keeps the family's."""
    cfg, rec = resolve_training_defaults(_train(epochs=1, batch_size=128), "mobilenetv3", teacher=True)
    assert cfg.label_smoothing == 0.0 and rec["label_smoothing"] == 0.0 and "label_smoothing" in rec["defaulted"]
    assert rec["label_smoothing_rule"] == ("a teacher: smoothed teachers teach less; the family's 0.1: "
                                           "--label-smoothing 0.1 for a model you deploy as trained")
    assert ("wd 0.05, no label smoothing (a teacher: smoothed teachers teach less; the family's 0.1: "
            "--label-smoothing 0.1 for a model you deploy as trained), grad-norm clip 5") in describe(rec)
    given, rec = resolve_training_defaults(_train(epochs=1, label_smoothing=0.1), "mobilenetv3", teacher=True)
    assert given.label_smoothing == 0.1 and "label_smoothing_rule" not in rec
    chain, rec = resolve_training_defaults(_train(epochs=1), "mobilenetv3")  # a distillation stage
    assert chain.label_smoothing == 0.1 and "label_smoothing_rule" not in rec
    resnet, rec = resolve_training_defaults(_train(epochs=1), "cifar_resnet", teacher=True)  # already 0: no rule
    assert resnet.label_smoothing == 0.0 and "label_smoothing_rule" not in rec
    # a training started before (the family's 0.1 recorded) resumes with it: the rule goes with the value
    started, rec_then = resolve_training_defaults(_train(epochs=1), "mobilenetv3")
    cfg, rec_now = resolve_training_defaults(_train(epochs=1), "mobilenetv3", teacher=True)
    kept_cfg, kept = keep_recorded_defaults(cfg, rec_now, rec_then)
    assert kept_cfg.label_smoothing == 0.1 and "label_smoothing_rule" not in kept
    assert kept["kept_from_run"] == {"label_smoothing": {"recorded": 0.1, "default_now": 0.0}}


def test_every_zoo_family_has_its_own_defaults():
    assert set(list_families()) <= set(FAMILY_DEFAULTS)


def test_mobilenetv3_defaults_scaled_to_the_batch_and_printed():
    cfg, rec = resolve_training_defaults(_train(epochs=1, batch_size=128), "mobilenetv3")
    # AdamW, 6e-3 per 128 images x sqrt(128/128) = 6e-3; warm-up min(5, 0.2 x 1 epoch) = 0.2
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.warmup_epochs) == ("adamw", 0.006, "cosine", 0.2)
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.grad_clip) == (0.05, 0.1, 5.0)
    assert rec["defaulted"] == list(DEFAULTED) and rec["family"] == "mobilenetv3"
    assert describe(rec) == ("training defaults for mobilenetv3: AdamW, lr 0.006 (0.006 per 128 images x "
                             "sqrt(128/128)), cosine, warm-up 0.2 epochs, wd 0.05, label smoothing 0.1, "
                             "grad-norm clip 5 -- set any with a flag or recipe")


def test_lr_scales_with_images_per_step_and_warmup_capped_by_the_run():
    cfg, rec = resolve_training_defaults(_train(epochs=160, batch_size=64, grad_accum=2), "cifar_resnet",
                                         num_processes=2)
    assert rec["images_per_step"] == 256 and cfg.lr == pytest.approx(0.2)  # 0.1 per 128 x 256
    assert cfg.warmup_epochs == 1.0 and cfg.label_smoothing == 0.0 and cfg.grad_clip == 0.0
    _, rec = resolve_training_defaults(_train(epochs=100, optimizer="sgd"), "regnety")
    assert rec["warmup_epochs"] == 5.0 and rec["lr"] == pytest.approx(0.1)  # SGD: 0.8 per 1024 x 128


def test_flags_and_recipes_win_and_nothing_is_mutated():
    given = _train(epochs=10, lr=0.3, schedule="step", label_smoothing=0.0, optimizer="sgd")
    cfg, rec = resolve_training_defaults(given, "mobilenetv2")
    assert (cfg.lr, cfg.schedule, cfg.label_smoothing) == (0.3, "step", 0.0)
    assert rec["defaulted"] == ["warmup_epochs", "weight_decay", "grad_clip"]
    assert given.weight_decay is None and given.warmup_epochs is None  # the given config is left as it was
    line = describe(rec)
    assert "lr" not in line.split(":")[1] and "warm-up 2 epochs" in line and "wd 4e-05" in line  # SGD's wd
    assert "AdamW" not in line


def test_a_model_that_starts_from_weights_fine_tunes_at_three_tenths_of_the_lr():
    # cifar_resnet: 0.1 per 128 images x 128 = 0.1, x 0.3 = 0.03; AdamW: 6e-3 x sqrt(1) x 0.3 = 1.8e-3
    cfg, rec = resolve_training_defaults(_train(epochs=3, batch_size=128), "cifar_resnet", from_weights=True)
    assert cfg.lr == pytest.approx(0.03) and rec["lr"] == 0.03
    assert "lr 0.03 (0.1 per 128 images x 128, x 0.3 to fine-tune the weights it starts from)" in describe(rec)
    assert (cfg.warmup_epochs, cfg.weight_decay) == (0.6, 5e-4)  # the rest of the family's settings stand
    assert resolve_training_defaults(_train(epochs=3, batch_size=128), "mobilenetv2", from_weights=True)[0].lr \
        == pytest.approx(0.0018)
    # a lr set by a flag or recipe is the user's: not scaled
    cfg, rec = resolve_training_defaults(_train(epochs=3, batch_size=128, lr=0.2), "cifar_resnet", from_weights=True)
    assert cfg.lr == 0.2 and "lr" not in rec["defaulted"]


def test_user_models_get_the_fallback():
    cfg, rec = resolve_training_defaults(_train(epochs=50), "user:my.py:Net")
    assert rec["family"] == "your model" and cfg.lr == pytest.approx(FALLBACK.lr * 128 / FALLBACK.per_images)
    assert cfg.grad_clip == FALLBACK.grad_clip > 0


def test_describe_when_everything_is_set():
    _, rec = resolve_training_defaults(_train(lr=0.1, schedule="step", warmup_epochs=0, weight_decay=1e-4,
                                              label_smoothing=0.0, grad_clip=0.0, optimizer="sgd"), "wrn")
    assert rec["defaulted"] == [] and "none used" in describe(rec)


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_recipes_pin_the_paper_settings(recipe):
    values = yaml.safe_load(recipe.read_text())
    cls = TrainConfig if "arch" in values else DistillConfig
    cli = {"teacher": "t.safetensors"} if cls is DistillConfig else {"out": "x.safetensors"}
    cfg = resolve_config(cls, str(recipe), cli)
    _, rec = resolve_training_defaults(cfg, "mobilenetv3")
    assert rec["defaulted"] == []  # no family default reaches a paper recipe
    assert cfg.warmup_epochs == 0 and cfg.label_smoothing == 0.0 and cfg.grad_clip == 0.0
    assert cfg.lr in (0.1, 0.01) and cfg.epoch_repeats == 1


def test_new_fields_are_validated():
    with pytest.raises(CompressError, match="label_smoothing must be in"):
        resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x", "label_smoothing": 1.0})
    with pytest.raises(CompressError, match="grad_clip must be >= 0"):
        resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x", "grad_clip": -1.0})
    cfg = resolve_config(TrainConfig, None, {"arch": "resnet8", "out": "x", "warmup_epochs": 0.5})
    assert cfg.warmup_epochs == 0.5


def test_fractional_warmup_then_cosine_per_step():
    cfg = _train(lr=0.1, schedule="cosine", warmup_epochs=0.2)
    assert lr_at_epoch(cfg, 0.1, 1) == pytest.approx(0.1 * 0.101 / 0.2)       # warming up
    assert lr_at_epoch(cfg, 0.6, 1) == pytest.approx(0.05)                      # half-way down the cosine
    assert lr_at_epoch(cfg, 0.2, 1) == pytest.approx(0.1)                       # peak right after warm-up
    plain = _train(lr=0.1, schedule="cosine", warmup_epochs=0)
    assert lr_at_epoch(plain, 5, 10) == pytest.approx(0.05)
    assert lr_at_epoch(plain, 2.5, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    paper = _train(lr=0.1, schedule="step", warmup_epochs=0, milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_at_epoch(paper, e, 160) for e in (79.9, 80, 120)] == pytest.approx([0.1, 0.01, 0.001])


def test_label_smoothing_in_the_ce_term():
    z = torch.tensor([[2.0, 0.0, 0.0]])
    y = torch.tensor([0])
    big = math.log(math.exp(2) + 2)  # logsumexp of [2, 0, 0] = 2.239493
    plain = dgkd_loss(z, [], y, temperature=4.0, kd_weight=0.5)["ce"]
    smooth = dgkd_loss(z, [], y, temperature=4.0, kd_weight=0.5, label_smoothing=0.3)["ce"]
    assert float(plain) == pytest.approx(big - 2, abs=1e-6)  # 0.239493
    # target (0.8, 0.1, 0.1): -(0.8 (2 - L) + 0.2 (-L)) = L - 1.6 = 0.639493
    assert float(smooth) == pytest.approx(big - 1.6, abs=1e-6)


def test_grad_clip_bounds_the_update():
    from accelerate import Accelerator

    from compressor.guides import GuideSet
    from compressor.trainer import LossSettings, train_one_epoch

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 100  # a huge input: a huge gradient
    y = torch.arange(8) % 3

    class Loader(list):
        dataset = None

    def step(clip):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        torch.manual_seed(1)
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        cfg = _train(lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", warmup_epochs=0,
                     grad_clip=clip, augment="none", mixed_precision="no")
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_one_epoch(acc, model, GuideSet([]), Loader([(x, y)]), opt, cfg=cfg, loss_cfg=LossSettings(),
                        mean=[0.0] * 3, std=[1.0] * 3, epoch=0, stage_seed=0, epochs=1)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    assert step(0.0) > 0.5
    assert step(0.05) == pytest.approx(0.05, rel=1e-4)  # lr 1 x gradient norm clipped to 0.05


def test_resume_of_a_run_written_before_the_family_defaults(tmp_path):
    """An old config.yaml has lr 0.1 etc. and no label_smoothing/grad_clip keys: the resumed run keeps them."""
    from compressor.pipeline import _check_resume_config

    old = config_to_dict(DistillConfig(teacher="t.safetensors", target="resnet8"))
    old.update(lr=0.1, schedule="step", warmup_epochs=0, weight_decay=1e-4, batch_size=128)
    for key in ("label_smoothing", "grad_clip", "epoch_repeats"):
        old.pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**old, "target": "resnet8", "num_processes": 1}))
    cfg = inherit_recorded(DistillConfig(teacher="t.safetensors", target="resnet8"), old)
    assert (cfg.lr, cfg.schedule, cfg.weight_decay, cfg.label_smoothing, cfg.grad_clip) == (0.1, "step", 1e-4, 0.0, 0.0)
    _check_resume_config(tmp_path, {**config_to_dict(cfg), "target": "resnet8", "num_processes": 1})  # no raise
    with pytest.raises(CompressError, match="different config"):  # an explicit change is still refused
        changed = inherit_recorded(DistillConfig(teacher="t.safetensors", target="resnet8", lr=0.05), old)
        _check_resume_config(tmp_path, {**config_to_dict(changed), "target": "resnet8", "num_processes": 1})
    # a run written with the family defaults (None recorded) resumes with the family defaults
    new = config_to_dict(DistillConfig(teacher="t.safetensors", target="resnet8"))
    assert inherit_recorded(DistillConfig(teacher="t.safetensors", target="resnet8"), new).lr is None
    assert set(LEGACY) == {"batch_size", "epoch_repeats", "kd_mixup", *DEFAULTED}
    assert cfg.batch_size == 128  # recorded before batch_size could be unset: kept
    assert cfg.epoch_repeats == 1  # recorded before epoch_repeats existed: one pass, as it trained


@pytest.mark.parametrize("images, processes, accum, batch", [
    (50000, 1, 1, 128), (4096, 1, 1, 128),   # 4096 / 128 = 32 steps: the full size
    (4095, 1, 1, 64), (2000, 1, 1, 32),      # 2000 / 64 = 31.25 < 32 -> 32 (62 steps)
    (1000, 1, 1, 16), (100, 1, 1, 16),       # never below 16
    (8192, 2, 1, 128), (8191, 2, 1, 64),     # 2 processes: 2 x 128 images per step
    (4096, 1, 2, 64),                        # grad_accum 2: 64 x 2 per optimiser step
])
def test_auto_batch_size_keeps_32_steps_per_epoch(images, processes, accum, batch):
    from compressor.training_defaults import auto_batch_size

    assert auto_batch_size(images, processes, accum) == batch


def test_auto_batch_size_is_resolved_recorded_and_printed_and_a_set_one_wins():
    from compressor.training_defaults import describe, resolve_batch_size

    cfg = TrainConfig(arch="resnet8", out="m.safetensors")
    assert cfg.batch_size is None
    auto, record = resolve_batch_size(cfg, 1000)
    assert auto.batch_size == 16 and cfg.batch_size is None
    assert record == {"batch_size": 16, "lr_batch_size": 128,
                      "batch_size_rule": "auto: 16, so that 1000 training images make at least 32 steps per epoch",
                      "epoch_repeats": 1, "epoch_repeats_rule": "auto: 1"}  # the suite sets one pass (conftest)
    # the shrunk batch keeps the full auto batch's lr: more steps, not smaller ones
    filled, rec = resolve_training_defaults(auto, "cifar_resnet", lr_batch_size=record["lr_batch_size"])
    assert filled.lr == 0.1 and rec["images_per_step"] == 16
    assert rec["lr_rule"] == "0.1 per 128 images x 128, the lr of the full auto batch"
    mobile, rec_m = resolve_training_defaults(auto, "mobilenetv2", lr_batch_size=128, num_processes=2)
    assert mobile.lr == pytest.approx(0.006 * 2 ** 0.5, abs=1e-6)  # 256 images per step's AdamW lr
    assert resolve_training_defaults(auto, "cifar_resnet")[0].lr == pytest.approx(0.1 * 16 / 128)  # a set batch
    line = describe({**rec, **record})
    assert "batch 16 (so that 1000 training images make" in line and "lr 0.1 (0.1 per 128 images x 128, the lr" in line
    big, record = resolve_batch_size(cfg, 50000)
    assert big.batch_size == 128 and "batch" not in describe({**resolve_training_defaults(big, "cifar_resnet")[1],
                                                              **record})
    given, record = resolve_batch_size(TrainConfig(arch="resnet8", out="m.safetensors", batch_size=64), 100)
    assert given.batch_size == 64 and record["batch_size_rule"] == "set" and record["lr_batch_size"] == 64


@pytest.mark.parametrize("images, repeats", [
    (450, 5),      # 2048 / 450 = 4.55 -> 5 passes (2,250 images an epoch)
    (1024, 2), (1025, 2), (2047, 2),
    (2048, 1), (50000, 1),   # from 2,048 images on: one pass
    (1, 2048),
])
def test_auto_epoch_repeats_make_an_epoch_at_least_2048_images(images, repeats, monkeypatch):
    from compressor.training_defaults import auto_epoch_repeats

    monkeypatch.delenv("COMPRESS_EPOCH_MIN_IMAGES", raising=False)
    assert auto_epoch_repeats(images) == repeats
    assert auto_epoch_repeats(images, min_images=0) == 1


def test_epoch_repeats_are_resolved_recorded_printed_and_a_set_one_wins(monkeypatch):
    from compressor.training_defaults import describe, resolve_batch_size

    monkeypatch.delenv("COMPRESS_EPOCH_MIN_IMAGES", raising=False)
    cfg = TrainConfig(arch="resnet8", out="m.safetensors")
    auto, record = resolve_batch_size(cfg, 450)
    assert (auto.batch_size, auto.epoch_repeats, cfg.epoch_repeats) == (16, 5, None)
    assert record["epoch_repeats"] == 5
    assert record["epoch_repeats_rule"] == "auto: 5, so that an epoch of 450 training images is at least 2048 images"
    line = describe({**resolve_training_defaults(auto, "cifar_resnet", lr_batch_size=128)[1], **record})
    assert "5 passes over the data per epoch (so that an epoch of 450 training images is at least 2048" in line
    set_, record = resolve_batch_size(TrainConfig(arch="resnet8", out="m.safetensors", epoch_repeats=2), 450)
    assert set_.epoch_repeats == 2 and record["epoch_repeats_rule"] == "set"
    assert "passes" not in describe({**resolve_training_defaults(set_, "cifar_resnet")[1], **record})
    one, record = resolve_batch_size(cfg, 4096)
    assert one.epoch_repeats == 1 and "passes" not in describe({**resolve_training_defaults(one, "cifar_resnet")[1],
                                                                **record})
    monkeypatch.setenv("COMPRESS_EPOCH_MIN_IMAGES", "900")
    assert resolve_batch_size(cfg, 450)[0].epoch_repeats == 2
    for bad in ("many", "-1"):
        monkeypatch.setenv("COMPRESS_EPOCH_MIN_IMAGES", bad)
        with pytest.raises(CompressError, match="COMPRESS_EPOCH_MIN_IMAGES"):
            resolve_batch_size(cfg, 450)
    with pytest.raises(CompressError, match="epoch_repeats must be > 0"):
        TrainConfig(arch="resnet8", out="m.safetensors", epoch_repeats=0).validate()


def test_train_prints_and_records_the_defaults(tmp_path, capsys, one_torch_thread):
    from compressor.checkpoint import read_checkpoint
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model

    cfg = resolve_config(TrainConfig, None, {"arch": "resnet8", "out": str(tmp_path / "m.safetensors"),
                                             "epochs": 1, "batch_size": 16, "mixed_precision": "no",
                                             "weight_decay": 1e-4})
    metrics = train_model(cfg, show_progress=False, data=synthetic_data(num_classes=4, n_train=32, n_test=8))
    out = capsys.readouterr().out
    assert ("training defaults for cifar_resnet: lr 0.0125 (0.1 per 128 images x 16), cosine, warm-up 0.2 epochs, "
            "no label smoothing, no grad clip -- set any with a flag or recipe") in out
    rec = metrics["training_defaults"]
    assert rec["lr"] == 0.0125 and rec["weight_decay"] == 1e-4 and "weight_decay" not in rec["defaulted"]
    _, meta = read_checkpoint(tmp_path / "m.safetensors")
    assert meta.metrics["training_defaults"] == rec
    assert meta.metrics["model_options"] == {"shortcut": "A"}  # the builder's default, recorded though not given
    # batch unset: 29 training images shrink it to 16, which keeps the lr of 128
    auto = resolve_config(TrainConfig, None, {"arch": "resnet8", "out": str(tmp_path / "a.safetensors"),
                                              "epochs": 1, "mixed_precision": "no"})
    rec = train_model(auto, show_progress=False,
                      data=synthetic_data(num_classes=4, n_train=32, n_test=8))["training_defaults"]
    assert (rec["batch_size"], rec["lr_batch_size"], rec["lr"]) == (16, 128, 0.1)


def test_train_of_a_smoothing_family_makes_an_unsmoothed_teacher(tmp_path, capsys, one_torch_thread):
    from compressor.checkpoint import read_checkpoint
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model

    cfg = resolve_config(TrainConfig, None, {"arch": "mobilenetv3_small_050", "out": str(tmp_path / "m.safetensors"),
                                             "epochs": 1, "batch_size": 16, "mixed_precision": "no"})
    train_model(cfg, show_progress=False, data=synthetic_data(num_classes=4, n_train=32, n_test=8))
    assert "wd 0.05, no label smoothing (a teacher: smoothed teachers teach less; the family's 0.1: " \
           "--label-smoothing 0.1 for a model you deploy as trained)" in capsys.readouterr().out
    metrics = read_checkpoint(tmp_path / "m.safetensors")[1].metrics
    rec = metrics["training_defaults"]
    assert rec["label_smoothing"] == 0.0 and "label_smoothing" in rec["defaulted"] and rec["label_smoothing_rule"]
    # how it started is recorded (its weights cannot say): the defaults matrix reads it to spot stale teachers
    assert metrics["model_options"] == {"stem": "cifar", "zero_init_last": True}


# --- issue 18: AdamW for the depthwise families (docs/results.md §5) ---

@pytest.mark.parametrize("batch, accum, processes, lr", [
    (128, 1, 1, 0.006),       # 6e-3 x sqrt(128/128)
    (32, 1, 1, 0.003),        # 6e-3 x sqrt(32/128) = 6e-3 / 2
    (512, 1, 1, 0.012),       # 6e-3 x sqrt(4)
    (64, 2, 2, 0.008485),     # 256 images per step: 6e-3 x sqrt(2) = 0.0084853 (rounded to 6 places)
])
def test_adamw_families_scale_the_lr_by_the_square_root_of_the_batch(batch, accum, processes, lr):
    for family in ("mobilenetv2", "mobilenetv3", "shufflenetv2", "efficientnet", "regnety"):
        cfg, rec = resolve_training_defaults(_train(epochs=1, batch_size=batch, grad_accum=accum), family,
                                             num_processes=processes)
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", lr, 0.05), family
        assert rec["lr_rule"] == f"0.006 per 128 images x sqrt({batch * accum * processes}/128)"


def test_sgd_families_keep_sgd_and_linear_scaling():
    for family, lr in (("cifar_resnet", 0.1), ("wrn", 0.1), ("vgg", 0.05), ("plain_cnn", 0.05),
                       ("imagenet_resnet", 0.05)):  # imagenet_resnet: 0.1 per 256 x 128
        cfg, rec = resolve_training_defaults(_train(epochs=1), family)
        assert (cfg.optimizer, cfg.lr) == ("sgd", lr), family
        assert "AdamW" not in describe(rec) and "SGD" not in describe(rec)
    cfg, _ = resolve_training_defaults(_train(epochs=1), "user:my.py:Net")
    assert cfg.optimizer == "sgd"


def test_an_explicit_optimizer_brings_its_own_lr_and_weight_decay():
    cfg, rec = resolve_training_defaults(_train(epochs=1, optimizer="sgd"), "mobilenetv3")
    assert (cfg.lr, cfg.weight_decay) == (0.05, 4e-5)  # torchvision's 0.4 per 1024 x 128, SGD's wd
    assert "optimizer" not in rec["defaulted"] and rec["lr_rule"] == "0.4 per 1024 images x 128"
    cfg, _ = resolve_training_defaults(_train(epochs=1, batch_size=512, optimizer="adamw"), "cifar_resnet")
    assert (cfg.lr, cfg.weight_decay) == (0.012, 0.05)
    cfg, _ = resolve_training_defaults(_train(epochs=1, lr=0.01, weight_decay=0.0), "mobilenetv2")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", 0.01, 0.0)  # flags win, optimizer defaulted


def test_build_optimizer_follows_the_resolved_optimizer():
    from compressor.trainer import build_optimizer

    model = torch.nn.Linear(3, 2)
    cfg, _ = resolve_training_defaults(_train(epochs=1), "mobilenetv3")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.006, 0.05)
    cfg, _ = resolve_training_defaults(_train(epochs=1), "cifar_resnet")
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.1, 5e-4)
    # a bare OptimConfig (benchmarks, tests) keeps the old SGD
    from compressor.config import OptimConfig
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.SGD


def test_optimizer_is_validated_and_a_resumed_old_run_keeps_sgd():
    with pytest.raises(CompressError, match="optimizer must be one of sgd, adamw; got 'adam'"):
        _train(optimizer="adam").validate()
    old = {k: v for k, v in config_to_dict(TrainConfig(arch="x", out="y.safetensors")).items() if k != "optimizer"}
    assert inherit_recorded(TrainConfig(arch="mobilenetv3_small_050", out="y.safetensors"), old).optimizer == "sgd"


def test_distill_stages_keep_the_full_auto_batch_lr(tmp_path, pretrained_teacher, one_torch_thread):
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8", method="ce",
                                                   epochs=1, out=str(tmp_path / "r"), latency_backend="none",
                                                   mixed_precision="no"))
    run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=8, seed=1), show_progress=False)
    rec = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["training_defaults"]["resnet8"]
    assert (rec["batch_size"], rec["lr_batch_size"], rec["lr"]) == (16, 128, 0.1)


def test_weights_that_solve_the_task_fine_tune_at_a_tenth_above_the_bar():
    from compressor.training_defaults import score_lower_bound, solves_task_threshold

    assert solves_task_threshold(10) == 55.0 and solves_task_threshold(2) == 75.0
    assert solves_task_threshold(100) == 50.5
    # Wilson, z 2: 60 % of 50 images: (0.6 + 0.04 - 2 sqrt(0.0048 + 0.0004)) / 1.08 = 45.905 %
    assert score_lower_bound(60.0, 50) == pytest.approx(45.9054, abs=1e-3)
    assert score_lower_bound(100.0, 12) == pytest.approx(75.0)  # 12 / (12 + 4): a perfect small sample
    cfg = TrainConfig(arch="resnet8", batch_size=128)
    kw = dict(lr_batch_size=128, from_weights=True, num_classes=10)

    def lr(top1, images):
        return resolve_training_defaults(cfg, "cifar_resnet", init_val={"top1": top1, "images": images}, **kw)[0].lr

    assert lr(79.8, 500) == pytest.approx(0.01)    # at least 76.0 %
    assert lr(60.0, 5000) == pytest.approx(0.01)   # at least 58.6 %
    assert lr(60.0, 50) == pytest.approx(0.03)     # at least 45.9 %: not shown to solve it
    assert lr(55.0, 10**6) == pytest.approx(0.03)  # at the bar is not above it
    assert resolve_training_defaults(cfg, "cifar_resnet", init_val=None, **kw)[0].lr == pytest.approx(0.03)
    _, rec = resolve_training_defaults(cfg, "cifar_resnet", init_val={"top1": 78.0, "images": 50}, **kw)
    assert (rec["init_val_top1"], rec["init_val_images"]) == (78.0, 50)
    # 78 % of 50: at least (0.78 + 0.04 - 2 sqrt(0.003432 + 0.0004)) / 1.08 = 64.46 %
    assert rec["lr_rule"].endswith("x 0.1 to fine-tune weights that already score 78.0% on 50 validation images "
                                   "(at least 64.5% at two standard errors, above 55.0%)")
    # AdamW families: 6e-3 per 128 images -> 6e-4
    _, rec = resolve_training_defaults(TrainConfig(arch="mobilenetv2_035", batch_size=128), "mobilenetv2",
                                       init_val={"top1": 90.0, "images": 500}, **kw)
    assert rec["lr"] == pytest.approx(6e-4)
    # a set lr is never scaled
    assert resolve_training_defaults(TrainConfig(arch="resnet8", batch_size=128, lr=0.05), "cifar_resnet",
                                     init_val={"top1": 99.0, "images": 500}, **kw)[0].lr == 0.05
