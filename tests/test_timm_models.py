"""timm models by name (``--arch timm:NAME``): build, refusals, checkpoints, pretrained_cfg defaults,
import, one training step, ONNX export. timm's tiny ``test_*`` models keep it to seconds; the whole
file is skipped when timm is absent (``pip install 'compress[timm]'``), but for the one test that
checks the message a missing timm gives."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from compressor.errors import CompressError
from conftest import run_cli_inprocess

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")

SMALL = "timm:test_efficientnet"  # 101,766 parameters at 10 classes; pretrained_cfg: ImageNet mean/std, 160 px
HALF = "timm:test_resnet"         # pretrained_cfg mean/std 0.5 (neither ImageNet's nor CIFAR's), crop_pct 0.95
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_timm_names_need_timm_installed(monkeypatch):
    from compressor.models import get_entry

    monkeypatch.setitem(sys.modules, "timm", None)  # "import timm" raises ImportError
    with pytest.raises(CompressError, match=r"pip install 'compress\[timm\]'"):
        get_entry("timm:resnet18")


# ---------------------------------------------------------------- 1. by name
@needs_timm
def test_build_by_name_without_trust():
    import timm

    from compressor.models import create_model, get_entry, input_size_for, model_identity
    from compressor.models.user import arch_slug
    from compressor.trust import Trust, check_recipe, is_code_ref

    entry = get_entry(SMALL)
    assert (entry.name, entry.family, entry.timm_name, entry.user_ref) == (SMALL, "timm", "test_efficientnet", "")
    assert entry.input_size == (3, 160, 160) == input_size_for(SMALL, {})  # the pretrained_cfg's input size
    model = create_model(SMALL, num_classes=4, in_chans=3, drop_rate=0.1)
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=4, drop_rate=0.1)
    assert type(model) is type(reference)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert model_identity(model) == {"arch": SMALL, "num_classes": 4, "in_chans": 3, "options": {"drop_rate": 0.1}}
    # a name, not code: no trust flag, and a recipe may name it
    assert not is_code_ref(SMALL) and is_code_ref("timm.models:resnet18") and Trust().allows(SMALL)
    check_recipe("r.yaml", {"arch": SMALL, "target": SMALL, "assistants": f"{HALF},{SMALL}"}, {})
    assert arch_slug(SMALL) == "timm_test_efficientnet"  # run and stage folder names
    # the pretrained tag picks the pretrained_cfg
    assert get_entry("timm:resnet18.a1_in1k").name == "timm:resnet18.a1_in1k"


@needs_timm
def test_bad_names_are_refused_in_one_line():
    from compressor.models import get_entry

    with pytest.raises(CompressError, match=r"timm has no model 'resnet18x' \(did you mean timm:resnet18"):
        get_entry("timm:resnet18x")
    with pytest.raises(CompressError, match="never downloads"):
        get_entry("timm:hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(CompressError, match="names no model"):
        get_entry("timm:")


@needs_timm
def test_pretrained_true_is_refused_pointing_at_init(tmp_path, capsys):
    from compressor.models import create_model

    with pytest.raises(CompressError, match=r"never downloads.*--init PATH"):
        create_model(SMALL, num_classes=4, pretrained=True)
    with pytest.raises(CompressError, match="checkpoint_path is not accepted"):
        create_model(SMALL, num_classes=4, checkpoint_path=str(tmp_path / "w.pth"))
    with pytest.raises(CompressError, match=r"timm could not build timm:test_efficientnet with no_such=1"):
        create_model(SMALL, num_classes=4, no_such=1)
    assert create_model(SMALL, num_classes=4, pretrained=False) is not None  # false is fine
    code, _, err = run_cli_inprocess(["train", "--arch", SMALL, "--option", "pretrained=True", "--data", "demo",
                                      "--out", tmp_path / "m.safetensors"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "--init PATH" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- checkpoints
def _save(path, model, **meta_kwargs):
    from compressor.checkpoint import meta_for, save_checkpoint

    meta = meta_for(SMALL, num_classes=4, in_chans=3, input_size=(3, 32, 32), **meta_kwargs)
    save_checkpoint(path, model, meta)
    return meta


@needs_timm
def test_checkpoint_round_trip_rebuilds_from_the_name(tmp_path):
    import timm
    from safetensors import safe_open

    from compressor.checkpoint import load_model
    from compressor.models import create_model

    model = create_model(SMALL, num_classes=4, drop_rate=0.1).eval()
    _save(tmp_path / "m.safetensors", model, model_kwargs={"drop_rate": 0.1})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        raw = fh.metadata()
    assert raw["arch"] == SMALL and raw["timm_version"] == timm.__version__
    assert json.loads(raw["model_kwargs"]) == {"drop_rate": 0.1} and raw["code_sha256"] == ""
    assert json.loads(raw["metrics"])["pretrained_cfg"]["input_size"] == [3, 160, 160]
    loaded, meta = load_model(tmp_path / "m.safetensors")  # no --trust-code, no --arch
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and meta.timm_version == timm.__version__


@needs_timm
def test_another_timm_version_is_named_only_when_the_tensors_differ(tmp_path):
    import timm
    from safetensors.torch import save_file

    from compressor.checkpoint import load_model, meta_for
    from compressor.models import create_model

    model = create_model(SMALL, num_classes=4).eval()
    # a timm upgrade that builds the same tensors: loads
    _save(tmp_path / "same.safetensors", model, timm_version="0.9.16")
    loaded, meta = load_model(tmp_path / "same.safetensors")
    assert meta.timm_version == "0.9.16"
    # one that renamed a tensor: refused, naming both versions
    state = dict(model.state_dict())
    state["head.weight"] = state.pop("classifier.weight")
    meta = meta_for(SMALL, num_classes=4, in_chans=3, input_size=(3, 32, 32), timm_version="0.9.16")
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta.to_strings())
    with pytest.raises(CompressError) as exc:
        load_model(tmp_path / "old.safetensors")
    text = str(exc.value)
    assert f"timm {timm.__version__} builds {SMALL} with other tensors than timm 0.9.16" in text
    assert "1 missing (e.g. classifier.weight); 1 unexpected (e.g. head.weight)" in text
    assert "pip install timm==0.9.16" in text and "\n" not in text
    # the same version: the usual mismatch message, no version talk
    meta.timm_version = timm.__version__
    save_file(state, str(tmp_path / "now.safetensors"), metadata=meta.to_strings())
    with pytest.raises(CompressError, match="weights do not match") as exc:
        load_model(tmp_path / "now.safetensors")
    assert "0.9.16" not in str(exc.value)
    # a crafted version string is refused as malformed metadata
    meta.timm_version = "1.0; rm -rf /" + "x" * 80
    save_file(dict(model.state_dict()), str(tmp_path / "bad.safetensors"), metadata=meta.to_strings())
    with pytest.raises(CompressError, match="timm_version .* is not a version number"):
        load_model(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- 2. pretrained_cfg defaults
@needs_timm
def test_pretrained_cfg_values_and_derived_defaults():
    from compressor.checkpoint import family_normalisation
    from compressor.models import get_entry
    from compressor.models.timm_models import eval_policy, preprocessing, pretrained_normalisation

    assert preprocessing(HALF) == {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                   "crop_pct": 0.95, "crop_mode": "center", "interpolation": "bilinear"}
    assert preprocessing("timm:resnet18.a1_in1k")["interpolation"] == "bicubic"
    assert family_normalisation(get_entry(HALF))[1:] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std, line = pretrained_normalisation(SMALL, 1)  # 1-channel data: the channel average
    assert mean == [pytest.approx(1.347 / 3)] and std == [pytest.approx(0.678 / 3)]
    assert "pretrained_cfg" in line and "--mean/--std to override" in line
    mean, std, _ = pretrained_normalisation(HALF, 3, mean=[0.1, 0.2, 0.3])  # a flag wins, per value
    assert (mean, std) == ([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    assert eval_policy(HALF, (3, 160, 160))[0] == "imagenet"  # crop_pct 0.95 < 1: a center crop
    assert eval_policy(HALF, (3, 32, 32))[0] == "cifar"       # small images: no crop margin


@needs_timm
@pytest.mark.parametrize("flags, mean, std", [
    ({}, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),                                  # the pretrained_cfg's
    ({"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}, [0.4] * 3, [0.2] * 3),  # explicit flags win
])
def test_one_tiny_train_step_uses_the_cfg_normalisation(tmp_path, capsys, one_torch_thread, flags, mean, std):
    import timm

    from compressor.checkpoint import load_model
    from compressor.config import TrainConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import train_model

    cfg = resolve_config(TrainConfig, None, {"arch": HALF, "out": str(tmp_path / "m.safetensors"), "epochs": 1,
                                             "batch_size": 16, "mixed_precision": "no",
                                             "bn_recalibration_batches": 0, **flags})
    train_model(cfg, show_progress=False, data=synthetic_data(num_classes=4, n_train=16, n_test=8))
    out = capsys.readouterr().out
    assert ("timm:test_resnet's pretrained_cfg" in out) == (not flags)
    model, meta = load_model(tmp_path / "m.safetensors")
    assert (list(meta.mean), list(meta.std)) == (mean, std)
    assert meta.arch == HALF and meta.timm_version == timm.__version__
    assert meta.metrics["pretrained_cfg"]["crop_pct"] == 0.95 and meta.metrics["epochs"] == 1
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


@needs_timm
def test_import_of_a_timm_state_dict_uses_the_cfg_defaults(tmp_path, capsys):
    import timm

    from compressor.checkpoint import load_model

    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=4).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    code, out, err = run_cli_inprocess(["import", tmp_path / "w.pth", "--arch", SMALL,
                                        "--out", tmp_path / "a.safetensors"], capsys)
    assert code == 0, err
    assert "timm pretrained_cfg (test_efficientnet) mean/std" in out and "evaluation crop: imagenet policy" in out
    model, meta = load_model(tmp_path / "a.safetensors")
    assert (list(meta.mean), list(meta.std), tuple(meta.input_size)) == (IMAGENET_MEAN, IMAGENET_STD, (3, 160, 160))
    assert meta.num_classes == 4 and meta.metrics["augment"] == "imagenet"
    assert meta.metrics["pretrained_cfg"]["crop_pct"] == 0.95
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(model(x), reference(x))
    # flags win: --mean/--std, and --image-size (small images: no crop margin)
    code, out, err = run_cli_inprocess(["import", tmp_path / "w.pth", "--arch", SMALL, "--mean", "0.5,0.5,0.5",
                                        "--std", "0.25,0.25,0.25", "--image-size", "32",
                                        "--out", tmp_path / "b.safetensors"], capsys)
    assert code == 0, err
    _, meta = load_model(tmp_path / "b.safetensors")
    assert (list(meta.mean), list(meta.std), tuple(meta.input_size)) == ([0.5] * 3, [0.25] * 3, (3, 32, 32))
    assert meta.metrics["augment"] == "cifar"


# ---------------------------------------------------------------- 3. ONNX
@needs_timm
def test_onnx_export_of_a_small_timm_model(tmp_path, one_torch_thread):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compressor.models import create_model
    from export.onnx_export import export_onnx, read_metadata

    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=4).eval()
    meta = _save(tmp_path / "m.safetensors", model)
    path = export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx")  # the default (dynamo) exporter
    props = read_metadata(onnx.load(str(path)))
    assert props["arch"] == SMALL and props["timm_version"] == meta.timm_version
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 4) and np.abs(got - want).max() < 1e-4


@needs_timm
def test_plan_with_a_timm_student_keeps_its_options_and_has_no_ladder():
    from compressor.planning import plan_chain

    plan = plan_chain(HALF, 4, SMALL, model_kwargs={"drop_rate": 0.1}, input_size=(3, 32, 32),
                      latency_backend="none")
    assert [(m.role, m.arch) for m in plan.members] == [("teacher", HALF), ("student", SMALL)]
    assert plan.members[-1].model_kwargs == {"drop_rate": 0.1}  # timm takes any option (checked when built)
    assert "no ladder for a timm student: name assistants with --assistants" in plan.rule
    # named timm assistants (MACs at 32 px: test_resnet 4.1M > test_efficientnet 2.3M > test_convnext 0.49M)
    named = plan_chain(HALF, 4, "timm:test_convnext", assistants=SMALL, input_size=(3, 32, 32),
                       latency_backend="none")
    assert [(m.role, m.arch) for m in named.members] == [("teacher", HALF), ("assistant", SMALL),
                                                         ("student", "timm:test_convnext")]
