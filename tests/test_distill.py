"""End-to-end distillation: CLI run, run directory, resume, determinism."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compressor.checkpoint import load_model, save_checkpoint
from compressor.cli import main
from compressor.config import DistillConfig, resolve_config
from compressor.data import synthetic_data
from compressor.errors import CompressError
from compressor.pipeline import run_distillation
from compressor.precision import PrecisionChoice, resolve_precision

# --no-gate-guides: the 1-epoch assistant may end near chance; this run checks dense guidance itself.
# The assistant is named: a 3.3x gap gets none by default (config.AUTO_SPACING).
TINY = ["--data", "demo", "--train-subset", "256", "--epochs", "1", "--batch-size", "64", "--no-gate-guides",
        "--assistants", "resnet14", "--seed", "3"]


def run_cli(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def test_tiny_distillation_through_the_cli(in_tmp, pretrained_teacher, capsys):
    code = run_cli(["distill", "--teacher", str(pretrained_teacher), "--target", "resnet8",
                    "--out", "runs/tiny", *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    run = in_tmp / "runs" / "tiny"
    for name in ("config.yaml", "plan.json", "summary.json", "report.md", "student.safetensors",
                 "accuracy_curves.png", "stages/1-resnet14/model.safetensors",
                 "stages/2-resnet8/model.safetensors", "stages/2-resnet8/metrics.jsonl"):
        assert (run / name).exists(), name
    assert not (run / "stages" / "2-resnet8" / "state").exists()  # removed once the stage is done
    assert (in_tmp / "runs" / "latest").resolve() == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert [m["arch"] for m in summary["chain"]] == ["resnet20", "resnet14", "resnet8"]
    assert summary["chain"][0]["final_test_top1"] > 70  # the pretrained teacher
    # every accuracy names its split: per-epoch on the held-out val split, test once at the end
    assert summary["per_epoch_split"] == "val"
    assert all(m["best_val_top1"] is not None and m["best_test_top1"] is None for m in summary["chain"][1:])
    assert summary["chain"][0]["best_val_top1"] is None  # the teacher is not trained here
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 1 and cfg["target"] == "resnet8" and cfg["method"] == "dgkd"
    # --mixed-precision auto (the default): the request and this machine's choice are recorded and printed
    choice = PrecisionChoice(**cfg["precision"])  # on a CPU with native bf16 with the speed probe's timings
    assert cfg["mixed_precision"] == "auto" and cfg["precision"] == summary["precision"]
    assert choice.requested == "auto" and choice.describe() in out
    plain = resolve_precision("auto")  # without a probe: the hardware's answer
    assert choice.mixed_precision in (plain.mixed_precision, "no") and (choice.probe is None) == (plain.reason ==
                                                                                                 choice.reason)
    # stage 2 (the student) was guided by teacher and assistant, one of them dropped per batch
    rec = [json.loads(line) for line in (run / "stages/2-resnet8/metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and sum(rec[0]["guide_uses"]) == rec[0]["steps"] == 4  # 256 / 64
    _, meta = load_model(run / "student.safetensors")
    assert meta.metrics["guides"] == ["resnet20", "resnet14"] and meta.mean == (0.485, 0.456, 0.406)
    assert meta.metrics["model_options"] == {"shortcut": "A"} and "model_options" not in summary["chain"][2]
    assert meta.metrics["precision"] == summary["precision"] and "precision" not in summary["chain"][2]
    assert "final test top-1 %" in out and "best val top-1 %" in out and "student" in out
    assert "val_top1" in rec[0] and "test_top1" not in rec[0] and "eval_top1" not in rec[0]

    # the run's own config.yaml is a recipe that gives back the run's settings (what it recorded
    # about how it ran -- precision, training defaults, the teacher's sha256 -- is not a setting)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert {"training_defaults", "teacher_sha256", "precision", "num_processes"} <= set(recorded)
    again = resolve_config(DistillConfig, str(run / "config.yaml"), {})
    assert (again.seed, again.epochs, again.train_subset, again.batch_size) == (3, 1, 256, 64)

    # a second run into the same directory is refused; --resume retrains nothing
    assert run_cli(["distill", "--teacher", str(pretrained_teacher), "--target", "resnet8",
                    "--out", "runs/tiny", *TINY]) == 2
    before = {p: p.stat().st_mtime_ns for p in run.glob("stages/*/model.safetensors")}
    assert run_cli(["distill", "--teacher", str(pretrained_teacher), "--target", "resnet8",
                    "--out", "runs/tiny", "--resume", *TINY]) == 0
    assert "not retrained" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in run.glob("stages/*/model.safetensors")}

    # --resume with a different config is refused and shows the difference
    assert run_cli(["distill", "--teacher", str(pretrained_teacher), "--target", "resnet8",
                    "--out", "runs/tiny", "--resume", *TINY[:-2], "--seed", "4"]) == 2
    assert "seed: 3 -> 4" in capsys.readouterr().err


def _run(tmp: Path, teacher, method: str, name: str, **extra):
    if method in ("dgkd", "takd"):  # a chain with an assistant (the default plans none for 3.3x)
        extra = {"assistants": "resnet14", **extra}
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(teacher), target="resnet8", method=method,
                                                   epochs=2, batch_size=32, out=str(tmp / name), seed=5,
                                                   lr=0.05, latency_backend="none", **extra))
    data = synthetic_data(num_classes=10, n_train=96, n_test=32, seed=1)
    return run_distillation(cfg, data=data, show_progress=False)


@pytest.mark.parametrize("method,chain", [("dgkd", 3), ("takd", 3), ("kd", 2), ("ce", 2)])
def test_same_seed_gives_bit_identical_student(tmp_path, pretrained_teacher, method, chain):
    a = _run(tmp_path, pretrained_teacher, method, "a")
    b = _run(tmp_path, pretrained_teacher, method, "b")
    assert len(a["chain"]) == chain
    ta = load_file(str(tmp_path / "a" / "student.safetensors"))
    tb = load_file(str(tmp_path / "b" / "student.safetensors"))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_methods_share_student_init_and_data_order(tmp_path, pretrained_teacher):
    # kd and ce differ only in the loss: after training the weights must differ, but with
    # kd_weight 0 (pure CE) kd equals ce exactly -- same init, data order and augmentation
    # (without the mixed images, which BatchNorm would see beside each batch even at λ 0).
    _run(tmp_path, pretrained_teacher, "ce", "ce")
    _run(tmp_path, pretrained_teacher, "kd", "kd0", kd_weight=0.0, kd_mixup=False)
    _run(tmp_path, pretrained_teacher, "kd", "kd1")
    ce = load_file(str(tmp_path / "ce" / "student.safetensors"))
    kd0 = load_file(str(tmp_path / "kd0" / "student.safetensors"))
    kd1 = load_file(str(tmp_path / "kd1" / "student.safetensors"))
    assert all(torch.equal(ce[k], kd0[k]) for k in ce)
    assert not all(torch.equal(ce[k], kd1[k]) for k in ce)


def test_num_classes_mismatch_is_refused(tmp_path, pretrained_teacher):
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8",
                                                   out=str(tmp_path / "r")))
    with pytest.raises(CompressError, match="teacher has 10 classes but the data has 5"):
        run_distillation(cfg, data=synthetic_data(num_classes=5))


def test_test_every_epoch_scores_the_test_split_and_changes_nothing_else(in_tmp, pretrained_teacher, capsys):
    """--test-every-epoch adds the test split's score to every epoch's metrics (the matrix's
    epoch-1 check reads it): reported only, the student and the validation scores stay the same.
    The student has dropout (MobileNetV2): scoring must not move the training's random stream."""
    common = ["distill", "--teacher", str(pretrained_teacher), "--target", "mobilenetv2_035", "--assistants", "0",
              "--method", "kd", "--data", "demo", "--train-subset", "64", "--epochs", "2", "--batch-size", "32",
              "--no-kd-mixup", "--seed", "5", "--latency-backend", "none", "--bn-recalibration-batches", "1"]
    assert run_cli([*common, "--out", "runs/a"]) == 0
    assert run_cli([*common, "--test-every-epoch", "--out", "runs/b"]) == 0
    out = capsys.readouterr().out
    rows = {r: [json.loads(x) for x in (in_tmp / "runs" / r / "stages/1-mobilenetv2_035/metrics.jsonl").read_text()
                .splitlines()] for r in "ab"}
    assert [x["val_top1"] for x in rows["a"]] == [x["val_top1"] for x in rows["b"]]
    assert all("test_top1" not in x for x in rows["a"])
    from compressor.data import load_data

    n_test = len(load_data("demo", splits=("test",)).test)
    for x in rows["b"]:  # a share of the 1,000 demo test images, not of the few validation images
        assert 0 <= x["test_top1"] <= 100 and x["test_loss"] > 0
        assert abs(x["test_top1"] * n_test / 100 - round(x["test_top1"] * n_test / 100)) < 1e-6
    assert "| test " in out
    a, b = (load_file(str(in_tmp / "runs" / r / "student.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((in_tmp / "runs/b/config.yaml").read_text())["test_every_epoch"] is True
    # --val-fraction 0 (the paper's protocol) evaluates on test already: no second score
    assert run_cli([*common, "--test-every-epoch", "--val-fraction", "0", "--epochs", "1", "--out", "runs/c"]) == 0
    row = json.loads((in_tmp / "runs/c/stages/1-mobilenetv2_035/metrics.jsonl").read_text().splitlines()[0])
    assert "test_top1" in row and "val_top1" not in row
