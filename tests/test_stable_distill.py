"""Stable distillation by default (issue 18, part 2): KD strength, warm-up, guide gating,
precise BatchNorm, loud warnings for a student near chance; run_distillation as a pipeline."""
import ast
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compressor.bn_recalibration import recalibrate_bn
from compressor.config import DistillConfig, resolve_config
from compressor.stability import (chance_top1, gated_guides, guide_gate, kd_warmup_for_stage,
                                  student_warnings)

REPO = Path(__file__).resolve().parents[1]
PAPER_RECIPES = ["cifar100_cnn_10-8-6-4-2", "cifar100_vgg13_vgg8", "cifar100_wrn40-2_wrn16-2",
                 "cifar10_cnn_10-8-6-4-2", "cifar10_resnet_26-20-14-8", "cpu_study",
                 "imagenet_resnet34_resnet18", "imagenet_resnet50_mobilenetv2"]


# ------------------------------------------------------------------ A, B: defaults
def test_defaults_do_not_grow_with_guides_and_warm_up():
    cfg = resolve_config(DistillConfig, None, {"teacher": "t.safetensors", "target": "resnet8"})
    assert cfg.kd_reduction == "mean" and cfg.kd_warmup_epochs == 1.0 and cfg.kd_weight == 0.5
    assert cfg.gate_guides is True and cfg.bn_recalibration_batches == 200
    assert cfg.kd_weighting == "confidence" and cfg.temperature is None and cfg.batch_size is None  # T: auto


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_pin_the_papers_kd(name):
    raw = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    assert raw["kd_reduction"] == "sum" and raw["kd_warmup_epochs"] == 0
    assert raw["kd_weighting"] == "uniform" and raw["gate_guides"] is False  # the paper weighs and keeps every guide
    assert raw["kd_mixup"] is False  # the paper's students learn from the labelled images only
    assert raw["temperature"] >= 4  # the paper's T (5; 4 where its recipe says so), not the default 2


def test_kd_warmup_is_at_most_a_quarter_of_a_stage():
    assert kd_warmup_for_stage(1.0, 1) == 0.25
    assert kd_warmup_for_stage(1.0, 3) == 0.75
    assert kd_warmup_for_stage(1.0, 160) == 1.0
    assert kd_warmup_for_stage(0.0, 10) == 0.0


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_kd_warmup_is_one_line(value):
    from compressor.errors import CompressError

    with pytest.raises(CompressError, match="kd_warmup_epochs"):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "kd_warmup_epochs": float(value)})


# ------------------------------------------------------------------ C: guide gating
def test_guide_gate_drops_an_assistant_near_chance_or_far_below_the_teacher():
    # the run: 10 classes, an 80.4 % teacher -> threshold 10 + max(2, 0.5 * 70.4) = 45.2
    gate = guide_gate(13.2, num_classes=10, teacher_top1=80.4)
    assert gate == {"top1": 13.2, "threshold": 45.2, "chance": 10.0, "kept": False, "reason": "far below the teacher"}
    assert guide_gate(11.9, num_classes=10, teacher_top1=80.4)["reason"] == "near chance"  # within 2 points
    assert guide_gate(28.2, num_classes=10, teacher_top1=80.4)["reason"] == "far below the teacher"
    assert guide_gate(45.3, num_classes=10, teacher_top1=80.4)["kept"]
    assert guide_gate(62.3, num_classes=10, teacher_top1=80.4)["kept"]  # the demo's assistant
    # a weak teacher: the 2-point floor; 100 classes: chance 1 %, 70 % teacher -> 1 + 34.5 = 35.5
    assert guide_gate(11.9, num_classes=10, teacher_top1=13.0)["threshold"] == 12.0
    assert guide_gate(11.9, num_classes=10, teacher_top1=20.0)["threshold"] == 15.0
    assert guide_gate(7.8, num_classes=100, teacher_top1=70.0) == {"top1": 7.8, "threshold": 35.5, "chance": 1.0,
                                                                    "kept": False, "reason": "far below the teacher"}
    assert guide_gate(None, num_classes=10, teacher_top1=80.0)["kept"]  # unknown score: kept
    assert not guide_gate(float("nan"), num_classes=10, teacher_top1=80.0)["kept"]


def test_surpassed_guides_are_the_earlier_ones_beaten_by_more_than_two_points():
    from compressor.stability import gate_text, surpassed_guides

    scores = {0: 40.0, 1: 55.0}
    assert surpassed_guides(scores, 2, 57.5) == {0: 2.0, 1: 2.0}   # no image counts: the 2-point floor
    assert surpassed_guides(scores, 2, 57.0) == {0: 2.0}           # 57.0 is not more than 2 points above 55.0
    assert surpassed_guides(scores, 1, 55.0) == {0: 2.0}           # only models before it
    assert surpassed_guides({0: None, 1: 30.0}, 2, 80.0) == {1: 2.0}
    assert surpassed_guides(scores, 2, None) == {} and surpassed_guides(scores, 2, float("nan")) == {}
    record = {"top1": 40.0, "kept": False, "reason": "surpassed by resnet14", "by": "resnet14", "by_top1": 55.0}
    assert gate_text(record) == "resnet14 after it scored 55.0%, more than 2 points above its 40.0%"
    assert gate_text({**record, "margin": 3.42}) == "resnet14 after it scored 55.0%, more than 3.42 points above its 40.0%"


def test_a_lead_within_the_noise_of_the_two_scores_does_not_surpass():
    """The 96-px cell (docs/results.md §6): a MobileNetV2-1.0 assistant at 68.4 % on 1,000 validation
    images over its 65.2 % teacher (3,000 test images). SE of the difference by hand:
    sqrt(.684*.316/1000 + .652*.348/3000) = sqrt(2.16144e-4 + 7.5632e-5) = 0.017082 -> margin 3.416."""
    from compressor.stability import surpass_margin, surpassed_guides

    assert surpass_margin(68.4, 1000, 65.2, 3000) == pytest.approx(3.4164, abs=1e-3)
    assert surpassed_guides({0: 65.2}, 1, 68.4, {0: 3000, 1: 1000}) == {}          # 3.2 < 3.42: kept
    assert surpassed_guides({0: 65.2}, 1, 68.7, {0: 3000, 1: 1000}) == {0: 3.41}   # 3.5 > 3.41: dropped
    # the weak-teacher case the rule is for still drops: 40 % teacher, 71 % assistant on 500 val images
    assert list(surpassed_guides({0: 40.0}, 1, 71.0, {0: 1000, 1: 500})) == [0]
    # large splits: the 2-point floor decides (10,000 and 5,000 images: 2 SE = 1.6 points)
    assert surpass_margin(70.0, 5000, 67.0, 10000) == 2.0
    assert surpass_margin(50.0, None, 40.0, None) == 2.0


def test_gated_guides_keep_one_guide_per_stage():
    assert gated_guides([0, 1, 2], {1}) == [0, 2]           # dgkd: the others still teach
    assert gated_guides([2], {2}) == [1]                    # takd: the nearest kept model before it
    assert gated_guides([2], {1, 2}) == [0]                 # ... down to the teacher
    assert gated_guides([], {1}) == []                      # ce stays without guides


# ------------------------------------------------------------------ D: precise BN
def test_recalibrated_running_mean_is_the_data_mean():
    bn = nn.BatchNorm1d(2, momentum=0.1)
    model = nn.Sequential(bn).eval()
    x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0], [7.0, 40.0]])
    assert recalibrate_bn(model, [x[:2], x[2:]]) == 2
    assert torch.allclose(bn.running_mean, torch.tensor([4.0, 25.0]))   # mean of the 4 rows
    assert torch.allclose(bn.running_var, torch.tensor([2.0, 50.0]))    # mean of the unbiased batch variances
    assert bn.momentum == 0.1 and not model.training                    # settings and mode restored
    # with the training default (momentum 0.1 from 0 / 1) one pass would give 0.1·mean: stale
    assert recalibrate_bn(model, [x], max_batches=1) == 1 and torch.allclose(bn.running_mean, torch.tensor([4.0, 25.0]))


def test_recalibration_without_batches_changes_nothing():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    assert recalibrate_bn(nn.Sequential(bn), []) == 0
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5)) and int(bn.num_batches_tracked) == 0
    assert recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), [torch.ones(1, 2)]) == 0  # no BN layer


def test_recalibration_leaves_the_global_random_stream_alone():
    # the train-mode forward draws dropout masks: the per-epoch refresh must not shift training's
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert recalibrate_bn(model, [torch.randn(8, 4, generator=torch.Generator().manual_seed(0))]) == 1
    assert torch.equal(torch.rand(3), expected)


def test_per_epoch_scores_use_refreshed_statistics_and_training_is_unchanged(tmp_path, one_torch_thread):
    from compressor.config import OptimConfig
    from compressor.data import make_loader, synthetic_data
    from compressor.trainer import LossSettings
    from compressor.progress import Progress
    from compressor.trainer import fit
    from accelerate import Accelerator

    bundle = synthetic_data(num_classes=4, input_size=(3, 8, 8), n_train=64, n_test=32, seed=2)
    calls = []

    def run(refresh):
        torch.manual_seed(0)
        stage_dir = tmp_path / ("refreshed" if refresh else "plain")
        stage_dir.mkdir()
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
        cfg = OptimConfig(lr=0.1, batch_size=16, epochs=2, optimizer="sgd", schedule="constant",
                          warmup_epochs=0.0, weight_decay=0.0, label_smoothing=0.0, grad_clip=0.0)
        return fit(Accelerator(cpu=True), model, [], make_loader(bundle.train, 16, shuffle=True, seed=1),
                   make_loader(bundle.test, 16, shuffle=False), cfg=cfg, loss_cfg=LossSettings(), epochs=2,
                   mean=[0.5] * 3, std=[0.25] * 3, stage_seed=7, stage_dir=stage_dir,
                   stage_label="m", resume=False, progress=Progress(enabled=False), refresh_bn=refresh)

    def refresh(model):  # the real recalibration: its train-mode forward runs the dropout
        calls.append(model)
        x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(9))
        return recalibrate_bn(model, [x, 2 * x, x + 1])

    plain = run(None)
    refreshed = run(refresh)
    assert len(calls) == 2 and all(isinstance(m, nn.Sequential) for m in calls)  # once per evaluated epoch, unwrapped
    assert [r["bn_batches"] for r in refreshed.history] == [3, 3] and "bn_batches" not in plain.history[0]
    # the weights' trajectory is the same (dropout masks included); the scores use the new statistics
    assert [r["train_loss"] for r in refreshed.history] == [r["train_loss"] for r in plain.history]
    assert all(a["val_loss"] != b["val_loss"] for a, b in zip(refreshed.history, plain.history))


# ------------------------------------------------------------------ E: warnings
def test_student_near_chance_gets_cause_and_fix():
    w = student_warnings("resnet8", top1=11.5, num_classes=10, train_losses=[2.3], steps=35)
    assert len(w) == 1 and "within 2 points of chance (10.0%)" in w[0] and "after 35 steps" in w[0]
    assert "fix:" in w[0] and "--epochs" in w[0]
    assert student_warnings("resnet8", top1=12.5, num_classes=10, train_losses=[2.3, 1.9]) == []
    assert chance_top1(100) == 1.0


def test_exploded_loss_without_nan_is_reported():
    w = student_warnings("mobilenetv3", top1=40.0, num_classes=10, train_losses=[2.0, 25.0])
    assert len(w) == 1 and "loss exploded" in w[0] and "from 2 (epoch 1) to 25" in w[0] and "--lr" in w[0]
    w = student_warnings("mobilenetv3", top1=40.0, num_classes=10, train_losses=[2.0], max_abs_logit=2e4)
    assert len(w) == 1 and "logits reach 2e+04" in w[0]
    assert student_warnings("m", top1=40.0, num_classes=10, train_losses=[2.0, 19.9], max_abs_logit=50.0) == []


# ------------------------------------------------------------------ F: the pipeline reads as one
def test_run_distillation_reads_as_plan_data_stages_report():
    from compressor import pipeline

    text = Path(pipeline.__file__).read_text()
    funcs = {n.name: ast.get_source_segment(text, n) for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    body = funcs["run_distillation"].split('"""')[-1]
    assert len(body.strip().splitlines()) <= 20
    for step in ("_load_teacher_and_data", "_open_run", "_teacher_row", "_run_stage", "_summary", "_finish_run"):
        assert step + "(" in body, step
    assert "_load_or_make_plan(" in funcs["_open_run"]


# ------------------------------------------------------------------ end to end (tiny, synthetic data)
def test_dropped_guide_recorded_and_student_warned(tmp_path, pretrained_teacher, monkeypatch, one_torch_thread, capsys):
    from compressor import pipeline
    from compressor.data import synthetic_data

    # every assistant fails its gate, whatever it scored: the student learns from the teacher alone
    monkeypatch.setattr(pipeline, "guide_gate", lambda top1, **kw: {"top1": top1 or 0.0, "threshold": 99.0,
                                                                      "chance": 10.0, "kept": False,
                                                                      "reason": "near chance"})
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8", method="dgkd",
                                                   epochs=1, batch_size=16, out=str(tmp_path / "r"), seed=5,
                                                   lr=0.05, latency_backend="none", bn_recalibration_batches=2,
                                                   assistants="resnet14"))
    summary = pipeline.run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1),
                                        show_progress=False)
    out = capsys.readouterr().out
    assert "guide resnet14 dropped:" in out and "guides resnet20 (resnet14 dropped: near chance)" in out
    assert summary["dropped_assistants"] == ["resnet14"]
    assert summary["dropped_guides"] == {"resnet14": [], "resnet8": ["resnet14"]}
    student = summary["chain"][-1]
    assert student["guides"] == ["resnet20"] and student["bn_recalibrated_batches"] == 2
    assert student["kd_warmup_epochs"] == 0.25
    # stage 1 has no guide to drop and only its teacher: 2 recalibration batches of 16 (the train split is 29)
    rec = [json.loads(x) for x in (tmp_path / "r" / "stages" / "2-resnet8" / "metrics.jsonl").read_text().splitlines()]
    assert rec[0]["guide_uses"] == [2]  # one guide, every step
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["dropped_guides"]["resnet8"] == ["resnet14"]
    # synthetic labels cannot be learnt in 2 steps: the student is near chance, loudly
    assert on_disk["student_near_chance"] is (student["final_test_top1"] <= 12.0)
    assert bool(on_disk["warnings"]) is on_disk["student_near_chance"]
    if on_disk["warnings"]:
        assert "WARNING: student resnet8" in out
    report = (tmp_path / "r" / "report.md").read_text()
    assert "guide resnet14 dropped" in report and "(dropped: resnet14)" in report


def test_an_assistant_that_beats_the_teacher_drops_it_from_later_stages():
    """The weak-teacher case (a teacher trained too briefly on the user's data): the student learns
    from the assistant alone, and the console, the summary and the report say why."""
    from types import SimpleNamespace

    from compressor import pipeline
    from compressor.report import stability_notes

    said = []
    members = [SimpleNamespace(arch=a) for a in ("resnet20", "resnet14", "resnet8")]
    splits = SimpleNamespace(eval=[0] * 100, test=[0] * 200)   # only their lengths are read
    run = SimpleNamespace(tmeta=SimpleNamespace(num_classes=10), teacher_top1=40.0, dropped={}, splits=splits,
                          guide_scores={0: 40.0}, guide_images={0: 200}, plan=SimpleNamespace(members=members),
                          say=said.append)
    gate = pipeline._gate_assistant(run, 1, "resnet14", {"final_val_top1": 55.0})
    assert gate["kept"] and set(run.dropped) == {0}
    assert run.dropped[0]["reason"] == "surpassed by resnet14" and run.guide_images == {0: 200, 1: 100}
    # 2 SE by hand: 200 * sqrt(.55*.45/100 + .4*.6/200) = 200 * sqrt(2.475e-3 + 1.2e-3) = 12.124
    assert run.dropped[0]["margin"] == 12.12
    assert said == ["guide resnet20 (the teacher) dropped: resnet14 after it scored 55.0%, more than 12.12 points "
                    "above its 40.0%; later stages learn from the better models (--no-gate-guides keeps it)"]
    assert gated_guides([0, 1], set(run.dropped)) == [1]  # the student's guides: the assistant only
    summary = {"chain": [{"arch": "resnet20"}, {"arch": "resnet14", "guide_gate": gate}, {"arch": "resnet8"}],
               "teacher_dropped": run.dropped[0]}
    assert stability_notes(summary) == ["guide resnet20 (the teacher) dropped: resnet14 after it scored 55.0%, "
                                        "more than 12.12 points above its 40.0%"]
    # an assistant 10 points above the teacher on these few images does not drop it (within 2 SE)
    run2 = SimpleNamespace(**{**vars(run), "dropped": {}, "guide_scores": {0: 40.0}, "guide_images": {0: 200}})
    pipeline._gate_assistant(run2, 1, "resnet14", {"final_val_top1": 50.0})
    assert run2.dropped == {}
    # scored on the test split (no validation split): its count is the test split's
    run3 = SimpleNamespace(**{**vars(run), "dropped": {}, "guide_scores": {0: 40.0}, "guide_images": {0: 200}})
    pipeline._gate_assistant(run3, 1, "resnet14", {"final_test_top1": 60.0})
    assert run3.guide_images[1] == 200 and run3.dropped[0]["margin"] == 9.8


def test_kd_logits_setting_reaches_every_kd_term(tmp_path, pretrained_teacher, monkeypatch, one_torch_thread):
    from compressor import pipeline, trainer
    from compressor.data import synthetic_data

    seen = []
    real = trainer.dgkd_loss
    monkeypatch.setattr(trainer, "dgkd_loss", lambda *a, **kw: (seen.append(kw.get("logits")), real(*a, **kw))[1])
    with pytest.raises(Exception, match="kd_logits must be one of raw, standardized"):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "kd_logits": "zscore"})
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8", method="kd",
                                                   epochs=1, batch_size=16, out=str(tmp_path / "r"), seed=5,
                                                   kd_logits="standardized", latency_backend="none",
                                                   bn_recalibration_batches=0))
    summary = pipeline.run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1),
                                        show_progress=False)
    assert seen and set(seen) == {"standardized"}  # every step of the stage
    assert summary["kd_logits"] == "standardized"
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["kd_logits"] == "standardized"
    assert "standardized logits" in (tmp_path / "r" / "report.md").read_text()
    assert resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8"}).kd_logits == "raw"


def test_kd_mixup_auto_rule_and_resume_of_older_runs():
    from compressor.training_defaults import AUTO_MIXUP_MAX_IMAGES, inherit_recorded, resolve_kd_mixup

    base = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8"})
    assert base.kd_mixup is None and AUTO_MIXUP_MAX_IMAGES == 2048
    on, rule = resolve_kd_mixup(base, 450)
    assert on.kd_mixup is True and rule == "auto: on, 450 training images (fewer than 2048)"
    off, rule = resolve_kd_mixup(base, 2048)
    assert off.kd_mixup is False and rule == "auto: off, 2048 training images (from 2048 on)"
    for given in (True, False):  # a flag or recipe wins at any size
        cfg, rule = resolve_kd_mixup(resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8",
                                                                          "kd_mixup": given}), 450)
        assert cfg.kd_mixup is given and rule == "set"
    # decided once, here: off with the reason where no mixes can be used, set or not
    for extra, reason in (({"method": "ce"}, "method ce: no guides label mixes"),
                          ({"unlabeled": "unl/"}, "the --unlabeled images take their place"),
                          ({"kd_mixup": True, "method": "ce"}, "method ce: no guides label mixes")):
        cfg, rule = resolve_kd_mixup(resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8",
                                                                          **extra}), 450)
        assert cfg.kd_mixup is False and rule.endswith(f"; off: {reason}")
    cfg, rule = resolve_kd_mixup(base, 450, in_memory=False)
    assert cfg.kd_mixup is False and rule == ("auto: on, 450 training images (fewer than 2048); off: the training "
                                              "images are streamed, not held in memory (--data-mode memory)")
    assert resolve_kd_mixup(base, 4096, in_memory=False) == (off, "auto: off, 4096 training images (from 2048 on)")
    # --resume of a run written before kd_mixup existed keeps training without mixes; a newer run keeps its record
    assert inherit_recorded(base, {}).kd_mixup is False
    assert inherit_recorded(base, {"kd_mixup": None}).kd_mixup is None


def test_temperature_auto_rule_and_resume_of_older_runs():
    from compressor.training_defaults import inherit_recorded, resolve_temperature

    base = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8"})
    assert base.temperature is None
    # the quick matrix's 3-epoch CIFAR-10 cell (1,800 images, 2 passes) and the demo at 9 epochs: short, T 2
    cfg, rule = resolve_temperature(base, 3 * 1800 * 2, 10)
    assert cfg.temperature == 2.0 and rule == "auto: 2, 10,800 training images seen by the student's stage (fewer than 100,000)"
    assert resolve_temperature(base, 9 * 4500, 10)[0].temperature == 2.0
    assert resolve_temperature(base, 99_999, 10)[0].temperature == 2.0
    # the CPU study's budget (15 epochs x 10,000 images): T 4, from 100,000 images on
    cfg, rule = resolve_temperature(base, 15 * 10_000, 10)
    assert cfg.temperature == 4.0 and rule == "auto: 4, 150,000 training images seen by the student's stage (from 100,000 on)"
    assert resolve_temperature(base, 100_000, 100)[0].temperature == 4.0
    # over 100 classes (ImageNet: KD recipes use T 1) it stays 2 at any length
    cfg, rule = resolve_temperature(base, 90 * 1_281_167, 1000)
    assert cfg.temperature == 2.0 and rule == "auto: 2, 1000 classes (T 4 only up to 100)"
    # a flag or recipe wins
    given = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "temperature": 5})
    assert resolve_temperature(given, 10, 10) == (given, "set") and given.temperature == 5.0
    # --resume of a run from before the auto rule keeps the T it recorded; a newer run's null stays auto
    assert inherit_recorded(base, {"temperature": 2.0}).temperature == 2.0
    assert inherit_recorded(base, {"temperature": None}).temperature is None
    assert inherit_recorded(given, {"temperature": 2.0}).temperature == 5.0  # given: checked, not inherited


def test_mixed_training_set_mixes_pairs_of_the_training_pixels_only():
    from compressor.data.memory import ImageSplit
    from compressor.data.unlabeled import MIXED_POOL_FACTOR, mixed_pixels, mixed_training_set

    # 3 training images, constant 0, 100, 200: every mix is round(w·a + (1 − w)·b) of two of them
    pixels = torch.tensor([0, 100, 200], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 3, (5,), generator=g), torch.randint(0, 3, (5,), generator=g)
    w = torch.rand(5, generator=g)
    expected = (w * (a * 100).float() + (1 - w) * (b * 100).float() + 0.5).to(torch.uint8)
    mixes = mixed_pixels(pixels, 5, 7)
    assert torch.equal(mixes[:, 0, 0, 0], expected) and bool((mixes == mixes[:, :, :1, :1]).all())
    split = ImageSplit(pixels, torch.tensor([0, 1, 2]))
    pool = mixed_training_set(split, seed=7)
    assert len(pool) == MIXED_POOL_FACTOR * 3 and bool((pool.split.labels == -1).all())
    assert torch.equal(pool.split.images, mixed_pixels(pixels, 12, 7))  # the same draw: seeded by the run
    assert pool.record()["images"] == 12 and "mixes of pairs of the 3 training images" in pool.notes[0]
    with pytest.raises(ValueError, match="uint8"):
        mixed_pixels(pixels.float(), 2, 0)
    assert pool.kind == "mixed"
    with pytest.raises(TypeError, match="in memory"):  # a streamed split: resolve_kd_mixup keeps it from here
        mixed_training_set(object(), seed=7)


def test_unlabeled_images_count_toward_the_auto_temperature_and_a_resumed_run_keeps_its_t():
    from compressor.training_defaults import resolve_temperature

    base = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8"})
    # 10 % of CIFAR-10's labels at the CPU budget: 15 x 4,500 labelled, as many unlabeled beside them
    cfg, rule = resolve_temperature(base, 15 * 4500, 10, unlabeled_seen=15 * 4500)
    assert cfg.temperature == 4.0
    assert rule == ("auto: 4, 135,000 training images seen by the student's stage, 67,500 of them unlabeled "
                    "(from 100,000 on)")
    assert resolve_temperature(base, 15 * 4500, 10)[0].temperature == 2.0   # the labelled ones alone
    cfg, rule = resolve_temperature(base, 3 * 4500, 10, unlabeled_seen=3 * 4500)
    assert cfg.temperature == 2.0 and rule.endswith("13,500 of them unlabeled (fewer than 100,000)")
    # --resume of a run that recorded auto T 2 under the earlier rule: trains on at T 2, says why
    old = "auto: 2, 67,500 training images seen by the student's stage (fewer than 100,000)"
    cfg, rule = resolve_temperature(base, 15 * 4500, 10, unlabeled_seen=15 * 4500, recorded_rule=old)
    assert cfg.temperature == 2.0 and rule == old + "; kept from the run (this version: T 4)"
    # ... resumed again: the note is not repeated
    assert resolve_temperature(base, 15 * 4500, 10, unlabeled_seen=15 * 4500, recorded_rule=rule)[1] == rule
    # a recorded "set" or the same auto T change nothing; a flag still wins
    assert resolve_temperature(base, 150_000, 10, recorded_rule="set")[0].temperature == 4.0
    given = resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "temperature": 3})
    assert resolve_temperature(given, 10, 10, recorded_rule=old) == (given, "set")
