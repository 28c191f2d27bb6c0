"""The one trust gate (compressor.trust): code runs only because the command line says so.

Each test plants a payload that would create a marker file if any code it names
ran, feeds the file to the real CLI or API, and checks the refusal (exit 2, one
line) and that the marker never appears.
"""
import json
import textwrap

import pytest
import yaml
from conftest import assert_refused, run_cli_inprocess as run_cli
from torch import nn

from compressor.errors import CompressError
from compressor.models import create_model
from compressor.trust import TRUST_KEYS, Trust, check_model_builder, check_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def evil_model_file(folder, marker):
    path = folder / "evil.py"
    path.write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes=10, in_chans=3):
                super().__init__()
                self.fc = nn.Linear(in_chans, num_classes)

            def forward(self, x):
                return self.fc(x.mean((2, 3)))
    """))
    return path


# ------------------------------------------------------------------ recipes cannot grant trust
def user_code_teacher(folder, marker):
    """A checkpoint whose arch is evil.py:Net (saved with the code named, then the marker removed)."""
    from compressor.checkpoint import meta_for, save_checkpoint

    evil_model_file(folder, marker)
    model = create_model("evil.py:Net", num_classes=10)
    save_checkpoint(folder / "t.safetensors", model, meta_for("evil.py:Net", num_classes=10))
    marker.unlink()
    import compressor.models.user as user

    user._loaded.clear()  # so that any later import of evil.py runs it (and creates the marker) again
    return folder / "t.safetensors"


@pytest.mark.parametrize("value", [True, False, "yes"])
def test_a_recipe_holding_trust_code_is_refused_and_runs_nothing(in_tmp, capsys, value):
    marker = in_tmp / "PWNED"
    teacher = user_code_teacher(in_tmp, marker)
    (in_tmp / "r.yaml").write_text(yaml.safe_dump({"trust_code": value, "target": "resnet8"}))
    code, _, err = run_cli(["plan", "--recipe", "r.yaml", "--teacher", teacher], capsys)
    assert_refused(code, err, marker, "r.yaml", "trust_code", "command line only", "--trust-code")


@pytest.mark.parametrize("key", TRUST_KEYS)
@pytest.mark.parametrize("command", ["plan", "distill", "train"])
def test_every_trust_key_is_refused_in_every_recipe(in_tmp, capsys, pretrained_teacher, key, command):
    (in_tmp / "r.yaml").write_text(yaml.safe_dump({key: True}))
    args = {"plan": ["plan", "--teacher", pretrained_teacher, "--target", "resnet8"],
            "distill": ["distill", "--teacher", pretrained_teacher, "--target", "resnet8", "--epochs", "1"],
            "train": ["train", "--arch", "resnet8", "--out", "m.safetensors", "--epochs", "1"]}[command]
    code, _, err = run_cli(args + ["--recipe", "r.yaml"], capsys)
    assert_refused(code, err, in_tmp / "none", key, "command line only")
    assert not (in_tmp / "runs").exists() and not (in_tmp / "m.safetensors").exists()


def test_the_command_line_flag_still_trusts(in_tmp, capsys):
    marker = in_tmp / "PWNED"
    teacher = user_code_teacher(in_tmp, marker)
    code, out, err = run_cli(["plan", "--teacher", teacher, "--target", "cnn2", "--trust-code",
                              "--latency-backend", "none"], capsys)
    assert marker.exists()  # the person said so: the code was imported
    assert "trust" not in err


def test_a_recipe_naming_assistant_code_needs_the_command_line(tmp_path):
    with pytest.raises(CompressError, match=r"names code \(assistants: resnet14,evil.py:Net\)"):
        check_recipe(tmp_path / "r.yaml", {"assistants": "resnet14,evil.py:Net"}, {})
    check_recipe(tmp_path / "r.yaml", {"assistants": "resnet14,evil.py:Net"}, {"assistants": "resnet14,evil.py:Net"})


def test_the_recorded_config_carries_no_trust_key():
    from compressor.config import DistillConfig, config_to_dict

    recorded = config_to_dict(DistillConfig(teacher="t.safetensors", target="resnet8", trust_code=True))
    assert not set(TRUST_KEYS) & set(recorded)
    assert recorded["target"] == "resnet8"


def test_trust_allows_only_what_was_named(tmp_path):
    (tmp_path / "a.py").write_text("")
    a = f"{tmp_path / 'a.py'}:Net"
    assert Trust().allows("resnet8")
    assert not Trust().allows(a)
    assert Trust(named=(a,)).allows(f"{tmp_path}/./a.py:Net")  # the same file, spelled differently
    assert not Trust(named=(a,)).allows(f"{tmp_path / 'a.py'}:Other")
    assert not Trust(named=("mypkg.nets:Net",)).allows("mypkg.nets:Other")
    assert Trust(trust_code=True).allows("anything.at:all")


# ------------------------------------------------------------------ a run's plan.json
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pretrained_teacher):
    from compressor.config import DistillConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    out = tmp_path_factory.mktemp("run") / "r"
    cfg = resolve_config(DistillConfig, None, dict(teacher=str(pretrained_teacher), target="resnet8", method="kd",
                                                   epochs=1, batch_size=16, out=str(out), latency_backend="none"))
    run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1), show_progress=False)
    return out, cfg


def _resume(out, cfg):
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    recorded = yaml.safe_load((out / "config.yaml").read_text())  # the copy's config names the copy
    (out / "config.yaml").write_text(yaml.safe_dump({**recorded, "out": str(out)}))
    return run_distillation(cfg, data=synthetic_data(num_classes=10, n_train=32, n_test=16, seed=1),
                            show_progress=False, resume=True)


@pytest.mark.parametrize("planted", ["file", "module"])
def test_a_plan_naming_code_is_refused_on_resume(finished_run, tmp_path, monkeypatch, planted):
    import shutil

    out, cfg = finished_run
    run = tmp_path / "r"
    shutil.copytree(out, run)
    marker = tmp_path / "PWNED"
    evil_model_file(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    student = plan["chain"][-1]
    if planted == "file":
        student["arch"] = "evil.py:Net"
    else:  # the reproduction: a shell command through a module reference
        student["arch"], student["model_kwargs"] = "subprocess:getoutput", {"cmd": f"touch {marker}"}
    (run / "plan.json").write_text(json.dumps(plan))
    shutil.rmtree(run / "stages")  # so the stage would be built anew from the plan
    cfg = type(cfg)(**{**cfg.__dict__, "out": str(run)})
    with pytest.raises(CompressError, match="plan.json names code") as exc:
        _resume(run, cfg)
    assert "\n" not in str(exc.value)
    assert not marker.exists()


def test_an_unchanged_plan_resumes(finished_run, tmp_path):
    import shutil

    out, cfg = finished_run
    shutil.copytree(out, tmp_path / "r")
    summary = _resume(tmp_path / "r", type(cfg)(**{**cfg.__dict__, "out": str(tmp_path / "r")}))
    assert summary["chain"][-1]["arch"] == "resnet8"


# ------------------------------------------------------------------ what a reference may point at
def test_module_references_reach_only_model_classes_and_factories(in_tmp, monkeypatch):
    marker = in_tmp / "PWNED"
    with pytest.raises(CompressError, match="no return annotation naming an nn.Module"):
        create_model("subprocess:getoutput", num_classes=10, cmd=f"touch {marker}")
    with pytest.raises(CompressError, match="class Popen, not a torch.nn.Module"):
        create_model("subprocess:Popen", num_classes=10, args=["touch", str(marker)])
    assert not marker.exists()

    (in_tmp / "pkg_gate").mkdir()
    (in_tmp / "pkg_gate" / "__init__.py").write_text("")
    (in_tmp / "pkg_gate" / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def annotated(num_classes=10) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        def plain(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    """))
    monkeypatch.syspath_prepend(str(in_tmp))
    assert isinstance(create_model("pkg_gate.nets:annotated", num_classes=3), nn.Module)
    with pytest.raises(CompressError, match="pkg_gate.nets:plain has no return annotation"):
        create_model("pkg_gate.nets:plain", num_classes=3)


def test_a_file_reference_reaches_only_what_the_file_defines(in_tmp):
    marker = in_tmp / "PWNED"
    (in_tmp / "mine.py").write_text("from os import system\nfrom subprocess import getoutput as Net\n")
    for name in ("system", "Net"):
        with pytest.raises(CompressError, match="not defined in that file|not an nn.Module"):
            create_model(f"mine.py:{name}", num_classes=10, command=f"touch {marker}")
    assert not marker.exists()


def test_check_model_builder_accepts_classes_and_annotated_factories():
    class Net(nn.Module):
        pass

    def factory() -> Net:
        return Net()

    check_model_builder(Net, "m:Net", module_name="m", from_file=False)
    check_model_builder(factory, "m:factory", module_name="m", from_file=False)
    with pytest.raises(CompressError):
        check_model_builder(len, "builtins:len", module_name="builtins", from_file=False)


# ------------------------------------------------------------------ a changed model file
def test_a_changed_code_file_is_refused_unless_accepted_and_the_acceptance_is_recorded(in_tmp, capsys):
    from compressor.checkpoint import load_model, meta_for, save_checkpoint

    marker = in_tmp / "PWNED"
    evil_model_file(in_tmp, marker)
    save_checkpoint(in_tmp / "m.safetensors", create_model("evil.py:Net", num_classes=10),
                    meta_for("evil.py:Net", num_classes=10))
    with open(in_tmp / "evil.py", "a") as fh:
        fh.write("# a comment, the layers are the same\n")
    code, _, err = run_cli(["eval", "m.safetensors", "--arch", "evil.py:Net", "--data", "demo"], capsys)
    assert code == 2 and "changed since" in err and "--accept-code-change" in err
    model, meta = load_model(in_tmp / "m.safetensors", arch="evil.py:Net", accept_code_change=True)
    change = meta.metrics["code_change_accepted"]
    assert change["recorded"] != change["current"] and "accept-code-change" in capsys.readouterr().err
    # accepting a change is no trust: the code still needs --arch or --trust-code
    with pytest.raises(CompressError, match="--trust-code"):
        load_model(in_tmp / "m.safetensors", accept_code_change=True)
