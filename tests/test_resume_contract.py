"""Issue 19, items 8-11 and 14: ``train``'s resume contract, the guide-cache key, the size
``import`` records, user models checked at the data's size, ``train --log-with``.

Each test fails on the code before the fix: ``train --resume`` compared nothing and
overwrote a saved state silently; the cache key ignored the guide's architecture and
options; ``import --option stem=cifar`` recorded 224 px (and had no ``--image-size``); a
user model without ``INPUT_SIZE`` was built-checked at 32 px; ``train --log-with
tensorboard`` passed no logging directory to Accelerate (a ValueError traceback).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from compressor.errors import CompressError
from conftest import ctrl_c_at_step


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


# ---------------------------------------------------------------- item 8: train --resume
def _train_cfg(out: Path, **changes):
    from compressor.config import TrainConfig, resolve_config

    values = dict(arch="resnet8", out=str(out), epochs=1, batch_size=16, seed=5, lr=0.05, val_fraction=0.0,
                  mixed_precision="no")
    return resolve_config(TrainConfig, None, {**values, **changes})


def _train(out: Path, *, resume: bool = False, **changes) -> dict:
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model

    data = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=1)  # 64 / 16 = 4 steps per epoch
    return train_model(_train_cfg(out, **changes), data=data, show_progress=False, resume=resume)


def test_train_resume_refuses_a_changed_config_and_continues_an_unchanged_one(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    _train(tmp_path / "ref.safetensors")  # uninterrupted
    out = tmp_path / "t.safetensors"
    work = tmp_path / "t.safetensors.train-state"
    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(out)
    monkeypatch.undo()
    recorded = (work / "config.yaml").read_text()
    assert "batch_size: 16" in recorded and (work / "state" / "resume.json").is_file() and not out.exists()

    # the case: 2 steps of 16 done, resumed with batches of 128 (plus lr, seed, augment): refused, one line
    with pytest.raises(CompressError) as exc:
        _train(out, resume=True, batch_size=128, lr=0.1, seed=6, augment="none")
    message = str(exc.value)
    assert "\n" not in message and "was started with a different config" in message
    for diff in ("augment: 'cifar' -> 'none'", "batch_size: 16 -> 128", "lr: 0.05 -> 0.1", "seed: 5 -> 6"):
        assert diff in message, message
    assert "epochs" not in message  # unchanged keys are not listed
    assert (work / "config.yaml").read_text() == recorded  # nothing written by the refused session

    # without --resume the saved state is never overwritten
    with pytest.raises(CompressError, match=r"holds an interrupted training of .*--resume.*rm -r"):
        _train(out)
    assert (work / "state" / "resume.json").is_file()

    # the state moved to another folder with its file (as the matrix copies a teacher) resumes there:
    # --out only says where the run is. The same flags continue at step 2 and give the uninterrupted
    # model; the state is removed
    moved = tmp_path / "moved" / "t.safetensors"
    moved.parent.mkdir()
    work.rename(moved.with_name(moved.name + ".train-state"))
    _train(moved, resume=True)
    assert "resumed resnet8 in epoch 1/1 after step 2" in capsys.readouterr().out
    assert moved.exists() and not moved.with_name(moved.name + ".train-state").exists() and not out.exists()
    a, b = load_file(str(moved)), load_file(str(tmp_path / "ref.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # nothing left to resume
    with pytest.raises(CompressError, match=r"nothing to resume for .*, which is finished\); drop --resume"):
        _train(moved, resume=True)


def test_sigterm_saves_the_running_step_like_ctrl_c_and_the_resumed_model_is_the_same(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption or time limit, ``timeout``) is deferred to the end of the
    running step like Ctrl-C; the state is saved there and :class:`Terminated` (a
    ``KeyboardInterrupt``, exit 143 from the CLI) raised; SIGTERM's default is back afterwards."""
    import json
    import signal

    from safetensors.torch import load_file

    from compressor.errors import Terminated

    _train(tmp_path / "ref.safetensors")
    out, work = tmp_path / "t.safetensors", tmp_path / "t.safetensors.train-state"
    calls = ctrl_c_at_step(monkeypatch, 3, sig=signal.SIGTERM)
    with pytest.raises(Terminated):
        _train(out)
    monkeypatch.undo()
    assert len(calls) == 3  # the running step finished, no further one started
    assert "SIGTERM: saving the training state after the running step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert json.loads((work / "state" / "resume.json").read_text())["step"] == 3 and not out.exists()

    _train(out, resume=True)
    assert "resumed resnet8 in epoch 1/1 after step 3" in capsys.readouterr().out
    a, b = load_file(str(out)), load_file(str(tmp_path / "ref.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_stop_signal_stops_at_once_and_only_default_handlers_are_taken_over(monkeypatch):
    import signal

    from compressor.errors import Terminated
    from compressor.trainer import DeferredStop

    with DeferredStop() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.hit == signal.SIGTERM and isinstance(stop.interrupt(), Terminated)
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
        stop.hit = None  # as if the loop had seen nothing: leaving the block must not raise
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt) as exc, DeferredStop():
        signal.raise_signal(signal.SIGINT)  # deferred; leaving the block raises it
    assert type(exc.value) is KeyboardInterrupt

    # a handler someone else installed (a framework's own SIGTERM handling) is left alone
    seen = []
    monkeypatch.setattr(signal, "getsignal", lambda s: seen.append(s) or (lambda *_: None))
    installed = []
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.append(s))
    with DeferredStop() as stop:
        pass
    assert set(seen) == {signal.SIGINT, signal.SIGTERM} and installed == [] and stop.hit is None


def test_train_resume_contract_through_the_cli(in_tmp, capsys):
    """Exit 2 with one line, before any data is loaded."""
    from conftest import run_cli_inprocess

    work = in_tmp / "t.safetensors.train-state"
    work.mkdir()
    (work / "config.yaml").write_text("batch_size: 16\n")
    args = ["train", "--arch", "resnet8", "--data", "nowhere", "--out", "t.safetensors"]
    code, _, err = run_cli_inprocess(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "holds an interrupted training of t.safetensors; continue it with --resume" in err
    code, _, err = run_cli_inprocess(["train", "--arch", "resnet8", "--data", "nowhere", "--out", "u.safetensors",
                                      "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "nothing to resume for u.safetensors" in err
    # --out and --resume are enough: the model and the data come from the recorded config.yaml
    (work / "config.yaml").write_text("arch: resnet8\ndata: nowhere\nbatch_size: 16\n")
    code, _, err = run_cli_inprocess(["train", "--out", "t.safetensors", "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "data path 'nowhere' does not exist" in err


def test_a_run_that_fails_before_any_saved_state_leaves_nothing_to_resume(tmp_path):
    out = tmp_path / "t.safetensors"
    with pytest.raises(CompressError, match="training diverged"):
        _train(out, lr=1e30)
    assert not (tmp_path / "t.safetensors.train-state").exists() and not out.exists()
    _train(out, epochs=1)  # a fresh start is not refused
    assert out.exists()


def test_one_resume_check_serves_train_and_distill(tmp_path):
    """``check_resume_config`` is shared: ignored keys pass, defaults fill keys an old file lacks."""
    from compressor.pipeline import RESUME_IGNORED_KEYS, _check_resume_config, check_resume_config

    path = tmp_path / "config.yaml"
    path.write_text("lr: 0.1\nlog_with: null\n")
    defaults = {"lr": 0.1, "log_with": None, "seed": 20}
    check_resume_config(path, {"lr": 0.1, "log_with": "tensorboard", "seed": 20}, defaults=defaults,
                        what="x", fix="fix it")  # log_with is ignored, seed taken from the defaults
    assert "log_with" in RESUME_IGNORED_KEYS and "compile" in RESUME_IGNORED_KEYS
    with pytest.raises(CompressError, match=r"^x was started with a different config \(seed: 20 -> 21\); fix it$"):
        check_resume_config(path, {"lr": 0.1, "seed": 21}, defaults=defaults, what="x", fix="fix it")
    (tmp_path / "config.yaml").write_text("lr: 0.2\n")  # distill's wrapper keeps working
    with pytest.raises(CompressError, match=r"lr: 0.2 -> 0.1"):
        _check_resume_config(tmp_path, {"lr": 0.1})


def test_resume_continues_the_recorded_config_under_the_flags(tmp_path):
    """``--resume`` (CLI): the run's config.yaml is the layer under the recipe and the flags."""
    from compressor.cli import _distill_config
    from compressor.config import DistillConfig, TrainConfig, resolve_config
    from compressor.pipeline import recorded_settings

    teacher = str(Path(__file__).resolve().parents[1] / "compressor" / "assets" /
                  "resnet20_cifar10_pretrained.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    # an older run: spacing 2.5 (that version's default), no kd_warmup_epochs key (written before it
    # existed: it trained without warm-up), record-only keys, a key no longer a setting
    (run / "config.yaml").write_text(f"teacher: {teacher}\ntarget: resnet8\nspacing: 2.5\nepochs: 7\n"
                                     "augment: true\nnum_processes: 1\nteacher_sha256: abc\nretired_key: 1\n"
                                     f"out: {run}\n")
    none = dict.fromkeys(("spacing", "epochs", "augment", "kd_warmup_epochs", "out"))
    cfg = _distill_config(teacher, "resnet8", None, None, (), {**none, "out": str(run)}, resume=True)
    assert (cfg.spacing, cfg.epochs, cfg.augment, cfg.kd_warmup_epochs) == (2.5, 7, "cifar", 0.0)
    assert DistillConfig().spacing == 6.0 and DistillConfig().kd_warmup_epochs == 1.0  # today's defaults differ
    cfg = _distill_config(teacher, "resnet8", None, None, (), {**none, "out": str(run), "epochs": 9}, resume=True)
    assert (cfg.epochs, cfg.spacing) == (9, 2.5)  # a flag wins (and the resume check refuses it)
    assert _distill_config(teacher, "resnet8", None, None, (), {**none, "out": str(run)}).spacing == 6.0  # no --resume
    # a target given replaces the recorded one; a latency-picked run does not pin its resolved arch
    base = recorded_settings(run / "config.yaml", DistillConfig, {"target_latency_ms": 0.2})
    assert "target" not in base and "num_processes" not in base and "retired_key" not in base
    (run / "config.yaml").write_text("target: resnet8\ntarget_latency_ms: 0.2\n")
    assert "target" not in recorded_settings(run / "config.yaml", DistillConfig, {})
    assert recorded_settings(tmp_path / "none.yaml", DistillConfig, {}) is None
    # a crafted config.yaml can neither grant trust nor name code the command line did not
    (run / "config.yaml").write_text("target: resnet8\ntrust_code: true\n")
    with pytest.raises(CompressError, match="holds trust_code: trust is given on the command line only"):
        recorded_settings(run / "config.yaml", DistillConfig, {})
    (run / "config.yaml").write_text("target: evil.py:Net\n")
    with pytest.raises(CompressError, match=r"names code \(target: evil.py:Net\).*pass --target evil.py:Net"):
        recorded_settings(run / "config.yaml", DistillConfig, {})
    assert "target" not in recorded_settings(run / "config.yaml", DistillConfig, {"target": "evil.py:Net"})  # given
    assert recorded_settings(run / "config.yaml", DistillConfig, {"trust_code": True})["target"] == "evil.py:Net"
    # train: the same layer, from OUT.train-state/config.yaml
    (tmp_path / "t.train-state").mkdir()
    (tmp_path / "t.train-state" / "config.yaml").write_text("arch: resnet8\nepochs: 4\nlr: 0.05\nprecision: {}\n")
    base = recorded_settings(tmp_path / "t.train-state" / "config.yaml", TrainConfig, {})
    cfg = resolve_config(TrainConfig, None, {"out": str(tmp_path / "t"), "epochs": None}, base=base)
    assert (cfg.arch, cfg.epochs, cfg.lr) == ("resnet8", 4, 0.05)


# ---------------------------------------------------------------- item 9: the guide-cache key
def test_cache_key_includes_the_guides_architecture_and_options(tmp_path, monkeypatch):
    import compressor.guides as guides
    from compressor.guides import open_guide_cache
    from compressor.models import create_model

    cifar = create_model("mobilenetv3_small_050", num_classes=10, stem="cifar")
    imagenet = create_model("mobilenetv3_small_050", num_classes=10, stem="imagenet")
    # the stem only changes strides: the same tensors (less the cifar stem's marker entry)
    tensors = {k: v for k, v in cifar.state_dict().items() if k != "small_image_stem"}
    imagenet.load_state_dict(tensors)
    # the cifar stem's marker entry alone would tell them apart: the key must not rest on the weights
    monkeypatch.setattr(guides, "weights_fingerprint", lambda model: "the same weights")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(cifar.eval()(x), imagenet.eval()(x))  # ... and other logits
    settings = {"storage": {"format": "dense"}, "seed": 1}

    def folder(guide):
        return open_guide_cache(tmp_path, guide, settings, epochs=1, steps=1, batch_size=2,
                                num_classes=10).directory

    assert folder(cifar) != folder(imagenet)
    # the same model built again (the stem left at its default, imagenet) shares the cache
    again = create_model("mobilenetv3_small_050", num_classes=10)
    again.load_state_dict(tensors)
    assert folder(again) == folder(imagenet)


def test_cache_key_includes_the_code_of_a_user_guide(in_tmp):
    from compressor.guides import open_guide_cache
    from compressor.models import create_model

    source = textwrap.dedent('''
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes=10, in_chans=3):
                super().__init__()
                self.fc = nn.Linear(in_chans, num_classes)

            def forward(self, x):
                return self.fc(x.mean((2, 3)){extra})
    ''')
    (in_tmp / "net.py").write_text(source.format(extra=""))
    first = create_model("net.py:Net", num_classes=10)
    (in_tmp / "net.py").write_text(source.format(extra=" * 2"))  # same weights, other logits
    second = create_model("net.py:Net", num_classes=10)
    second.load_state_dict(first.state_dict())
    settings = {"storage": {"format": "dense"}}
    folders = {open_guide_cache(in_tmp / "cache", g, settings, epochs=1, steps=1, batch_size=2,
                                num_classes=10).directory for g in (first, second)}
    assert len(folders) == 2


# ---------------------------------------------------------------- item 10: the size import records
def test_import_records_the_size_the_model_is_built_for(in_tmp, capsys):
    from conftest import run_cli_inprocess

    from compressor.checkpoint import read_checkpoint
    from compressor.models import create_model

    # torchvision-layout weights (an imagenet-stem state dict) import under either stem
    torch.save(create_model("mobilenetv3_small_050", num_classes=10, stem="imagenet").state_dict(), in_tmp / "w.pth")
    base = ["import", "w.pth", "--arch", "mobilenetv3_small_050"]

    code, out, err = run_cli_inprocess(base + ["--option", "stem=cifar", "--out", "cifar.safetensors"], capsys)
    assert code == 0, err
    assert "input size: 32x32 px" in out
    assert tuple(read_checkpoint("cifar.safetensors")[1].input_size) == (3, 32, 32)

    code, _, err = run_cli_inprocess(base + ["--option", "stem=cifar", "--image-size", "48",
                                             "--out", "c48.safetensors"], capsys)
    assert code == 0, err
    assert tuple(read_checkpoint("c48.safetensors")[1].input_size) == (3, 48, 48)

    code, _, err = run_cli_inprocess(base + ["--out", "imagenet.safetensors"], capsys)  # the family's size
    assert code == 0, err
    assert tuple(read_checkpoint("imagenet.safetensors")[1].input_size) == (3, 224, 224)


def test_import_refuses_a_size_the_model_does_not_take(in_tmp, capsys):
    from conftest import run_cli_inprocess

    from compressor.models import create_model

    torch.save(create_model("cnn2", num_classes=10).state_dict(), in_tmp / "w.pth")
    code, _, err = run_cli_inprocess(["import", "w.pth", "--arch", "cnn2", "--image-size", "64",
                                      "--out", "x.safetensors"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cnn2 fails on a (2, 3, 64, 64) input" in err and "--image-size" in err
    assert not (in_tmp / "x.safetensors").exists()
    code, _, err = run_cli_inprocess(["import", "w.pth", "--arch", "cnn2", "--image-size", "2",
                                      "--out", "x.safetensors"], capsys)
    assert code == 2 and "--image-size must be in 8..4096" in err


def test_input_size_for_follows_the_options():
    from compressor.models import input_size_for

    assert input_size_for("mobilenetv3_small_050") == (3, 224, 224)
    assert input_size_for("mobilenetv3_small_050", {"stem": "cifar"}) == (3, 32, 32)
    assert input_size_for("resnet18", {"stem": "cifar"}, in_chans=1) == (1, 32, 32)
    assert input_size_for("efficientnet_b1") == (3, 240, 240)
    assert input_size_for("cnn4", {"input_hw": 28}) == (3, 28, 28)


# ---------------------------------------------------------------- item 11: user models at the data's size
FLAT28 = textwrap.dedent('''
    from torch import nn

    class Flat28(nn.Module):
        """Takes 28x28 images only (a linear layer on the flattened pixels); no INPUT_SIZE."""

        def __init__(self, num_classes=10, in_chans=1):
            super().__init__()
            self.fc = nn.Linear(in_chans * 28 * 28, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))
''')


def test_user_model_without_input_size_is_checked_at_the_datas_size(in_tmp, capsys):
    from conftest import run_cli_inprocess
    from data_folders import write_uniform_folder

    from compressor.checkpoint import read_checkpoint
    from compressor.models import create_model

    (in_tmp / "flat.py").write_text(FLAT28)
    ref = "flat.py:Flat28"
    model = create_model(ref, num_classes=2, in_chans=1)  # building checks nothing at a default 32 px
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 2)

    write_uniform_folder(in_tmp / "gray28", 28, mode="L", per_class=8, classes=2)
    code, _, err = run_cli_inprocess(["train", "--arch", ref, "--data", "gray28", "--epochs", "1", "--batch-size",
                                      "8", "--mixed-precision", "no", "--out", "f.safetensors"], capsys)
    assert code == 0, err
    assert tuple(read_checkpoint("f.safetensors", arch=ref)[1].input_size) == (1, 28, 28)
    # on 32-px data the one fits-check refuses it before training, with the training fix
    code, _, err = run_cli_inprocess(["train", "--arch", ref, "--data", "demo", "--epochs", "1",
                                      "--out", "g.safetensors"], capsys)
    assert code == 2 and err.count("\n") == 1 and "fails on a (2, 3, 32, 32) input" in err
    assert "the data is 32x32 px" in err and not (in_tmp / "g.safetensors.train-state").exists()

    from compressor.models import check_fits  # the one fits-check, at any size

    check_fits(ref, {}, 2, (1, 28, 28))
    with pytest.raises(CompressError, match=r"flat.py:Flat28 fails on a \(2, 1, 32, 32\) input"):
        check_fits(ref, {}, 2, (1, 32, 32))


# ---------------------------------------------------------------- item 14: train --log-with
@pytest.fixture
def fake_tensorboard(monkeypatch):
    """Accelerate's tensorboard code path (a tracker that needs a logging directory) with a
    recording stand-in, so the test needs no tensorboard package."""
    from accelerate import tracking
    from accelerate.utils import LoggerType

    made = []

    class FakeTensorBoard(tracking.GeneralTracker):
        name = "tensorboard"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            self.run_name, self.logging_dir, self.logged, self.config, self.finished = \
                run_name, str(logging_dir), [], None, False
            made.append(self)

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = dict(values)

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    monkeypatch.setattr(tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTensorBoard)
    return made


def test_train_logs_to_tensorboard_under_the_output(tmp_path, fake_tensorboard):
    out = tmp_path / "t.safetensors"
    _train(out, log_with="tensorboard")
    (tracker,) = fake_tensorboard
    assert tracker.logging_dir == str(tmp_path / "t.safetensors.logs") and tracker.run_name == "t"
    assert tracker.config["batch_size"] == 16 and tracker.finished
    (step, values), = tracker.logged
    assert step == 1 and "resnet8/train_loss" in values and "resnet8/test_top1" in values
    assert out.exists()


def test_an_unknown_tracker_is_one_line(tmp_path):
    with pytest.raises(CompressError, match=r"--log-with") as exc:
        _train(tmp_path / "t.safetensors", log_with="nosuchtracker")
    assert "\n" not in str(exc.value)


def test_a_resumed_training_keeps_the_family_defaults_it_started_with(tmp_path, monkeypatch, capsys):
    """A run resumed after an upgrade that changed a family default (here: label smoothing, which
    the run left unset) trains on with the value its config.yaml recorded, not this version's: the
    resumed model equals one trained without a break at the recorded value, and says so."""
    from safetensors.torch import load_file

    import compressor.training_defaults as td
    from compressor.checkpoint import load_model

    _train(tmp_path / "ref.safetensors", label_smoothing=0.2)  # what the older default gives, no break
    out, work = tmp_path / "t.safetensors", tmp_path / "t.safetensors.train-state"
    # the older version: compress train defaulted to label smoothing 0.2 (today: 0)
    monkeypatch.setattr(td, "TEACHER_LABEL_SMOOTHING", 0.2)
    ctrl_c_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(out)
    monkeypatch.undo()  # the upgrade
    assert "label_smoothing: 0.2" in (work / "config.yaml").read_text()

    _train(out, resume=True)
    said = capsys.readouterr().out
    assert "resnet8: resumed with the label smoothing 0.2 the run started with (this version's default: " \
           "label smoothing 0)" in said, said
    kept = load_model(out)[1].metrics["training_defaults"]
    assert kept["label_smoothing"] == 0.2 and kept["kept_from_run"] == {
        "label_smoothing": {"recorded": 0.2, "default_now": 0.0}}
    a, b = load_file(str(out)), load_file(str(tmp_path / "ref.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_recorded_defaults_takes_only_what_both_versions_defaulted():
    from compressor.config import TrainConfig
    from compressor.training_defaults import keep_recorded_defaults, resolve_training_defaults

    cfg, record = resolve_training_defaults(TrainConfig(arch="resnet8", epochs=10, batch_size=128, weight_decay=1e-3),
                                            "cifar_resnet")
    assert (cfg.lr, cfg.warmup_epochs) == (0.1, 1.0)
    old = {**record, "lr": 0.05, "lr_rule": "an older rule", "warmup_epochs": 0.0, "weight_decay": 5e-4}
    kept_cfg, kept = keep_recorded_defaults(cfg, record, old)
    assert (kept_cfg.lr, kept_cfg.warmup_epochs, kept["lr_rule"]) == (0.05, 0.0, "an older rule")
    assert kept_cfg.weight_decay == 1e-3  # set by a flag now: not the recorded value
    assert set(kept["kept_from_run"]) == {"lr", "warmup_epochs"}
    # a field the old run set (not defaulted) stays this version's default; no record: nothing kept
    old_set = {**old, "defaulted": [k for k in record["defaulted"] if k != "lr"]}
    assert keep_recorded_defaults(cfg, record, old_set)[0].lr == 0.1
    assert keep_recorded_defaults(cfg, record, None) == (cfg, record)
    assert keep_recorded_defaults(cfg, record, record) == (cfg, record)  # the same defaults: record unchanged
