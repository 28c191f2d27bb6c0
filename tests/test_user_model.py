"""Your own model (``file.py:NAME``) through the CLI, and the rule that no code runs from a checkpoint."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from compressor.checkpoint import CheckpointMeta, file_sha256, load_model, save_checkpoint
from compressor.errors import CompressError
from compressor.models import count_macs, count_params, create_model
from compressor.planning import plan_chain

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

MODEL_FILE = textwrap.dedent('''
    from torch import nn

    class TinyCNN(nn.Module):
        LADDER = {"w16": {"width": 16}}

        def __init__(self, num_classes=10, in_chans=3, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))

    def tiny_factory(width=4):
        return TinyCNN(width=width)

    def not_a_model(num_classes=10):
        return 42

    class WrongOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3))   # (N, 3), not (N, num_classes)
''')


def cli(capsys, *args):
    """Run ``compress ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from compressor.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def model_file(in_tmp):
    path = in_tmp / "mynet.py"
    path.write_text(MODEL_FILE)
    return path


def test_user_model_builds_counts_and_plans(model_file):
    ref = "mynet.py:TinyCNN"
    m = create_model(ref, num_classes=10, width=8)
    # conv 3*8*9+8, BN 16, fc 8*10+10 = 330 parameters; MACs conv 16*16*8*27 + fc 80 = 55,376
    assert count_params(m) == 330
    assert count_macs(m, (3, 32, 32)) == 55_376
    assert count_params(create_model("mynet.py:tiny_factory")) == 3 * 4 * 9 + 4 + 8 + 4 * 10 + 10
    # the student's LADDER gives the assistant
    plan = plan_chain("resnet8", 10, ref, model_kwargs={"width": 8}, measure_latency=False)
    assert [(m.arch, m.model_kwargs) for m in plan.members] == [
        ("resnet8", {}), (ref, {"width": 16}), (ref, {"width": 8})]
    # a user model named as the assistant of a zoo student (width=300 reaches only the model that takes it):
    # resnet8 12.2 M MACs > TinyCNN(300) 2.1 M > cnn2 1.0 M
    plan = plan_chain("resnet8", 10, "cnn2", assistants=ref, model_kwargs={"width": 300}, measure_latency=False)
    assert [m.arch for m in plan.members] == ["resnet8", ref, "cnn2"]
    assert plan.members[1].model_kwargs == {"width": 300} and plan.members[2].model_kwargs == {}


def test_train_distill_export_eval_through_the_cli(model_file, pretrained_teacher, capsys, monkeypatch):
    monkeypatch.setattr("compressor.pipeline.write_report", lambda run_dir: None)  # matplotlib: tested elsewhere
    ref = "mynet.py:TinyCNN"
    tiny = ["--data", "demo", "--epochs", "1", "--train-subset", "64", "--batch-size", "32"]
    code, out, err = cli(capsys, "train", "--arch", ref, "--option", "width=8", "--out", "mine.safetensors", *tiny)
    assert code == 0, err
    model, meta = load_model("mine.safetensors", arch=ref)
    assert meta.arch == ref and meta.model_kwargs == {"width": 8}
    assert meta.code_sha256 == file_sha256(model_file)

    # as target and (from its LADDER) as assistant, with a zoo teacher
    code, out, err = cli(capsys, "distill", "--teacher", pretrained_teacher, "--target", ref, "--option", "width=8",
                         "--out", "run", "--latency-backend", "none", *tiny)
    assert code == 0, err
    summary = json.loads((model_file.parent / "run" / "summary.json").read_text())
    assert [(m["arch"], m["model_kwargs"]) for m in summary["chain"]] == [
        ("resnet20", {}), (ref, {"width": 16}), (ref, {"width": 8})]
    assert "mynet.py:TinyCNN(width=16)" in out

    # the student names user code: export and eval need the same --arch (or --trust-code)
    code, _, err = cli(capsys, "eval", "run/student.safetensors", "--data", "demo")
    assert code == 2 and err.count("\n") == 1 and "names user code mynet.py:TinyCNN" in err
    assert "--arch mynet.py:TinyCNN" in err and "--trust-code" in err
    code, out, err = cli(capsys, "export", "run", "--arch", ref, "--out", "student.onnx")
    assert code == 0, err
    assert "parity" in out.lower()
    code, out, err = cli(capsys, "eval", "run/student.safetensors", "--data", "demo", "--arch", ref)
    assert code == 0 and "top-1" in out, err
    code, out, err = cli(capsys, "eval", "student.onnx", "--data", "demo")  # ONNX runs no Python code
    assert code == 0 and "onnxruntime" in out, err

    # a changed file is refused, naming it; so is a missing one
    model_file.write_text(MODEL_FILE + "\n# edited\n")
    code, _, err = cli(capsys, "eval", "run/student.safetensors", "--data", "demo", "--trust-code")
    assert code == 2 and err.count("\n") == 1 and "mynet.py changed since" in err
    model_file.unlink()
    code, _, err = cli(capsys, "eval", "run/student.safetensors", "--data", "demo", "--arch", ref)
    assert code == 2 and err.count("\n") == 1 and "mynet.py" in err and "does not exist" in err


@pytest.mark.parametrize("name,message", [
    ("Nope", "has no attribute 'Nope' (defined there: TinyCNN, WrongOutput, not_a_model, tiny_factory)"),
    ("not_a_model", "returned a int, not a torch.nn.Module"),
    ("WrongOutput", "outputs (2, 3) for a batch of 2"),
])
def test_bad_user_models_exit_2_with_one_line(model_file, capsys, name, message):
    code, _, err = cli(capsys, "train", "--arch", f"mynet.py:{name}", "--data", "demo", "--out", "x.safetensors")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert "Traceback" not in err
    assert not (model_file.parent / "x.safetensors").exists()


def test_missing_file_and_bad_reference(in_tmp, capsys):
    code, _, err = cli(capsys, "train", "--arch", "nothere.py:Net", "--data", "demo", "--out", "x.safetensors")
    assert code == 2 and "model file 'nothere.py'" in err and "does not exist" in err
    with pytest.raises(CompressError, match="must be path/to/file.py:NAME"):
        create_model("mynet.py:")


def test_a_checkpoint_never_imports_the_code_it_names(in_tmp, capsys):
    """A checkpoint naming a .py whose import writes a marker: without the opt-in the marker never appears."""
    marker = in_tmp / "MARKER"
    evil = in_tmp / "evil.py"
    evil.write_text(MODEL_FILE + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    # a checkpoint built without importing evil.py: same architecture, from the string above
    scope: dict = {}
    exec(compile(MODEL_FILE, "inline", "exec"), scope)
    save_checkpoint(in_tmp / "ckpt.safetensors", scope["TinyCNN"](),
                    CheckpointMeta(arch="evil.py:TinyCNN", num_classes=10, code_sha256=file_sha256(evil)))

    with pytest.raises(CompressError, match="names user code evil.py:TinyCNN"):
        load_model(in_tmp / "ckpt.safetensors")
    for command in (["eval", "ckpt.safetensors", "--data", "demo"], ["export", "ckpt.safetensors"],
                    ["plan", "--teacher", "ckpt.safetensors", "--target", "resnet8"],
                    ["distill", "--teacher", "ckpt.safetensors", "--target", "resnet8", "--data", "demo"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and "--trust-code" in err, (command, err)
    assert not marker.exists()

    model, meta = load_model(in_tmp / "ckpt.safetensors", trust_code=True)
    assert marker.exists() and meta.arch == "evil.py:TinyCNN"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_package_module_reference(in_tmp, monkeypatch):
    from compressor.checkpoint import meta_for

    (in_tmp / "mypkg").mkdir()
    (in_tmp / "mypkg" / "__init__.py").write_text("")
    (in_tmp / "mypkg" / "nets.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(in_tmp))
    model = create_model("mypkg.nets:TinyCNN", num_classes=4, width=2)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    meta = meta_for("mypkg.nets:TinyCNN", num_classes=4, model_kwargs={"width": 2})
    assert meta.arch == "mypkg.nets:TinyCNN" and meta.code_sha256 == file_sha256(in_tmp / "mypkg" / "nets.py")
    with pytest.raises(CompressError, match="module 'mypkg.nope' .* cannot be found"):
        create_model("mypkg.nope:TinyCNN")


def test_the_readme_example_file_plans_its_ladder():
    from pathlib import Path

    ref = f"{Path(__file__).resolve().parents[1] / 'examples' / 'my_model.py'}:SmallCNN"
    plan = plan_chain("resnet20", 10, ref, model_kwargs={"width": 8}, measure_latency=False, spacing=2.5)
    assert [m.model_kwargs.get("width") for m in plan.members[1:]] == [64, 32, 16, 8]
    # convs 216 + 1,152 + 4,608, BatchNorms 16 + 32 + 64, linear 32*10+10 = 330
    assert plan.members[-1].params == 6_418
