"""Starting a model from weights you have (compressor.init_weights)."""
import pytest
import torch
import yaml
from torch import nn

from compressor.checkpoint import file_sha256, meta_for, save_checkpoint
from compressor.errors import CompressError
from compressor.init_weights import adapt_channels, init_from_checkpoint
from compressor.models import create_model


def test_same_model_loads_every_tensor_and_records_the_sha(tmp_path):
    src = create_model("resnet8", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = create_model("resnet8", num_classes=10)
    report = init_from_checkpoint(dst, tmp_path / "w.pth")
    assert report.loaded == report.total and report.loaded_share == 1.0
    assert report.sha256 == file_sha256(tmp_path / "w.pth") and report.mean is None
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


def test_other_class_count_replaces_only_the_classifier(tmp_path):
    src = create_model("resnet8", num_classes=100)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    dst = create_model("resnet8", num_classes=4)
    fresh_fc = dst.linear.weight.detach().clone()
    report = init_from_checkpoint(dst, tmp_path / "w.pth")
    assert report.classifier_replaced == ["linear.weight", "linear.bias"]
    assert torch.equal(dst.linear.weight, fresh_fc)  # the head keeps its fresh initialisation
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    # every parameter but the 4x64 + 4 head came from the file: 75,290 - 650 params at 10 classes
    head = 4 * 64 + 4
    total = sum(p.numel() for p in dst.parameters())
    assert report.loaded_share == pytest.approx((total - head) / total)


def test_rgb_weights_start_a_grayscale_model_summed_over_channels():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)  # [[0,1,2],[3,4,5]]
    assert adapt_channels(w, 1).flatten().tolist() == [3.0, 12.0]
    g = torch.tensor([[[[6.0]]]])
    assert adapt_channels(g, 3).flatten().tolist() == [2.0, 2.0, 2.0]  # repeated, x 1/3


def test_grayscale_model_from_rgb_checkpoint(tmp_path):
    src = create_model("resnet8", num_classes=10)
    save_checkpoint(tmp_path / "rgb.safetensors", src, meta_for("resnet8", num_classes=10,
                                                                mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)))
    dst = create_model("resnet8", num_classes=10, in_chans=1)
    report = init_from_checkpoint(dst, tmp_path / "rgb.safetensors")
    assert report.channels_adapted == ["conv1.weight 3->1"]
    assert torch.allclose(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert report.mean == (0.5, 0.4, 0.3)  # what the weights expect travels with them


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save(nn.Linear(3, 10).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CompressError, match="only 0% of the model's parameters match"):
        init_from_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "other.pth")


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CompressError, match="refusing to unpickle"):
        init_from_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_train_init_records_the_file_and_keeps_its_normalisation(tmp_path):
    from compressor.checkpoint import load_model
    from compressor.config import TrainConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model

    src = create_model("resnet8", num_classes=100)
    save_checkpoint(tmp_path / "init.safetensors", src, meta_for("resnet8", num_classes=100,
                                                                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)))
    cfg = resolve_config(TrainConfig, None, dict(arch="resnet8", out=str(tmp_path / "m.safetensors"), epochs=1,
                                                 batch_size=16, init=str(tmp_path / "init.safetensors")))
    train_model(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1), show_progress=False)
    model, meta = load_model(tmp_path / "m.safetensors")
    assert meta.mean == (0.5, 0.4, 0.3) and meta.std == (0.2, 0.2, 0.2)
    init = meta.metrics["init"]
    assert init["sha256"] == file_sha256(tmp_path / "init.safetensors")
    assert init["classifier_replaced"] == ["linear.weight", "linear.bias"]
    # fine-tuning: 0.1 per 128 images x 16 = 0.0125, x 0.3 = 0.00375
    assert meta.metrics["training_defaults"]["lr"] == 0.00375


def test_distill_starts_the_student_from_weights_you_have(tmp_path, pretrained_teacher):
    from compressor.checkpoint import load_model
    from compressor.config import DistillConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    torch.save(create_model("resnet8", num_classes=100).state_dict(), tmp_path / "r8.pth")
    base = dict(teacher=str(pretrained_teacher), target="resnet8", method="kd", epochs=1, batch_size=16,
                latency_backend="none", init_student=str(tmp_path / "r8.pth"))
    data = synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1)
    with pytest.raises(CompressError, match="init_assistants names resnet14, not an assistant of this plan"):
        run_distillation(resolve_config(DistillConfig, None, dict(base, out=str(tmp_path / "bad"),
                                                                  init_assistants={"resnet14": str(tmp_path / "r8.pth")})),
                         data=data, show_progress=False)
    assert not (tmp_path / "bad" / "config.yaml").exists()  # refused before anything is written
    run_distillation(resolve_config(DistillConfig, None, dict(base, out=str(tmp_path / "run"))), data=data,
                     show_progress=False)
    _, meta = load_model(tmp_path / "run" / "student.safetensors")
    assert meta.metrics["init"]["sha256"] == file_sha256(tmp_path / "r8.pth")
    assert meta.metrics["init"]["classifier_replaced"] == ["linear.weight", "linear.bias"]
    # the student fine-tunes at 0.3 x its family's lr (0.1 per 128 x 16 = 0.0125 -> 0.00375)
    rec = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training_defaults"]["resnet8"]
    assert rec["lr"] == 0.00375 and "fine-tune" in rec["lr_rule"]


def test_weights_that_already_solve_the_task_fine_tune_at_a_tenth(tmp_path):
    # A model trained on these images scores above the bar (halfway from chance to 100 %) on the
    # validation split before training: the default lr is 0.1x, not 0.3x, and the record says why.
    from compressor.checkpoint import load_model
    from compressor.config import TrainConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model
    from compressor.training_defaults import solves_task_threshold

    data = synthetic_data(num_classes=4, n_train=120, n_test=16, seed=3)
    base = dict(arch="resnet8", batch_size=16, seed=0)
    train_model(resolve_config(TrainConfig, None, dict(base, out=str(tmp_path / "first.safetensors"), epochs=4)),
                data=data, show_progress=False)
    cfg = resolve_config(TrainConfig, None, dict(base, out=str(tmp_path / "again.safetensors"), epochs=1,
                                                 init=str(tmp_path / "first.safetensors")))
    train_model(cfg, data=data, show_progress=False)
    rec = load_model(tmp_path / "again.safetensors")[1].metrics["training_defaults"]
    assert solves_task_threshold(4) == 62.5
    assert rec["init_val_top1"] > 62.5, rec
    # 0.1 per 128 images x 16 = 0.0125, x 0.1 = 0.00125
    assert rec["lr"] == 0.00125
    assert rec["init_val_images"] == 12  # 10 % of 120
    assert (f"already score {rec['init_val_top1']:.1f}% on 12 validation images (at least" in rec["lr_rule"]
            and rec["lr_rule"].endswith("above 62.5%)"))


def test_no_score_without_a_validation_split_or_with_a_new_classifier(tmp_path):
    from types import SimpleNamespace

    from compressor.pipeline import init_val_score

    def boom(*a, **k):
        raise AssertionError("evaluated")

    kept, replaced = SimpleNamespace(classifier_replaced=[]), SimpleNamespace(classifier_replaced=["fc.weight"])
    on_test, on_val = SimpleNamespace(eval_name="test"), SimpleNamespace(eval_name="val")
    assert init_val_score(None, boom, kept, on_test, None, None, None) is None  # the test split makes no choice
    assert init_val_score(None, boom, replaced, on_val, None, None, None) is None
    assert init_val_score(None, boom, None, on_val, None, None, None) is None


def test_distill_scores_the_student_init_and_fine_tunes_weights_that_solve_the_task(tmp_path, pretrained_teacher):
    from compressor.config import DistillConfig, TrainConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation, train_model

    from compressor.checkpoint import load_model

    data = synthetic_data(num_classes=10, n_train=200, n_test=16, seed=3)
    tmeta = load_model(pretrained_teacher)[1]  # the chain's normalisation: the init trains in it too
    train_model(resolve_config(TrainConfig, None, dict(arch="resnet8", batch_size=16, epochs=6,
                                                       mean=list(tmeta.mean), std=list(tmeta.std),
                                                       out=str(tmp_path / "r8.safetensors"))),
                data=data, show_progress=False)
    run_distillation(resolve_config(DistillConfig, None, dict(
        teacher=str(pretrained_teacher), target="resnet8", method="ce", epochs=1, batch_size=16,
        latency_backend="none", init_student=str(tmp_path / "r8.safetensors"), out=str(tmp_path / "run"))),
        data=data, show_progress=False)
    rec = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training_defaults"]["resnet8"]
    assert rec["init_val_top1"] > 55.0, rec
    assert rec["lr"] == 0.00125 and "already score" in rec["lr_rule"]  # 0.1 per 128 x 16 x 0.1


def test_weights_trained_at_another_size_are_scored_at_their_own_size_too(monkeypatch):
    # A model that only reads 16-px images (any other size: always class 0) scores chance on 32-px
    # validation images and 100 % on the same images fitted to 16 px, the size its file records:
    # the higher score counts, and the record says it was measured resized.
    from types import SimpleNamespace

    from accelerate import Accelerator

    from compressor.config import TrainConfig
    from compressor.data.memory import ImageSplit
    from compressor.pipeline import init_val_score
    from compressor.training_defaults import init_score_text, resolve_training_defaults

    class SixteenPixelsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            bright = (x.mean(dim=(1, 2, 3)) > 0).float() * self.scale
            if x.shape[-2:] != (16, 16):
                bright = torch.zeros_like(bright)
            return torch.stack([1 - bright, bright], dim=1)

    labels = torch.arange(20) % 2
    pixels = (labels.view(-1, 1, 1, 1) * 200 + 20).expand(20, 3, 32, 32).to(torch.uint8).contiguous()
    splits = SimpleNamespace(eval_name="val", eval=ImageSplit(pixels, labels))
    cfg = SimpleNamespace(batch_size=8, data_workers=0)
    args = (Accelerator(cpu=True), SixteenPixelsOnly(), None, splits, cfg, [0.5] * 3, [0.25] * 3)
    at_16 = SimpleNamespace(classifier_replaced=[], input_size=(3, 16, 16))
    score = init_val_score(*args[:2], at_16, *args[3:])
    assert score == {"top1": 100.0, "images": 20, "px": 16, "resized": True}
    assert init_score_text(score) == ("score 100.00% on the 20 validation images resized to 16 px, the size they "
                                      "were trained at, before training")
    unrecorded = SimpleNamespace(classifier_replaced=[], input_size=None)  # a foreign file: the data's size only
    plain = init_val_score(*args[:2], unrecorded, *args[3:])
    assert plain == {"top1": 50.0, "images": 20, "px": 32, "resized": False}
    assert init_score_text(plain) == "score 50.00% on the 20 validation images before training"
    import compressor.pipeline as pipeline

    monkeypatch.setattr(pipeline, "INIT_SCORE_MAX_IMAGES", 6)  # a large split: its first images decide
    assert init_val_score(*args[:2], at_16, *args[3:])["images"] == 6
    _, rec = resolve_training_defaults(
        TrainConfig(arch="resnet8", data="x", out="y", batch_size=16), "cifar_resnet", from_weights=True,
        init_val=score, num_classes=2)
    assert rec["init_val_px"] == 16 and "validation images resized to 16 px, the size they were trained at (at least" \
        in rec["lr_rule"]


def test_a_label_smoothed_teacher_gets_a_note(tmp_path, capsys):
    # Smoothed teachers distil worse (docs/results.md §6): a teacher whose checkpoint records label
    # smoothing gets one printed note with the fix; an unsmoothed one, or method ce, none.
    from compressor.config import DistillConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation
    from compressor.training_defaults import recorded_label_smoothing

    data = synthetic_data(num_classes=4, n_train=32, n_test=8, seed=2)
    for smoothing in (0.1, 0.0):
        torch.manual_seed(0)
        meta = meta_for("resnet14", num_classes=4, metrics={"training_defaults": {"label_smoothing": smoothing}})
        save_checkpoint(tmp_path / f"t{smoothing}.safetensors", create_model("resnet14", num_classes=4), meta)
        assert recorded_label_smoothing(meta.metrics) == smoothing
        for method in ("kd", "ce"):
            capsys.readouterr()
            run_distillation(resolve_config(DistillConfig, None, dict(
                teacher=str(tmp_path / f"t{smoothing}.safetensors"), target="resnet8", method=method, epochs=1,
                batch_size=16, latency_backend="none", out=str(tmp_path / f"run-{smoothing}-{method}"))),
                data=data, show_progress=False)
            noted = "note: the teacher was trained with label smoothing 0.1" in capsys.readouterr().out
            assert noted == (smoothing == 0.1 and method == "kd"), (smoothing, method)
    assert recorded_label_smoothing(meta_for("resnet8", num_classes=4).metrics) == 0.0  # nothing recorded
