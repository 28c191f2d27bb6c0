"""Every torchvision family exports to one self-contained ONNX file that passes parity, imports
torchvision-layout state dicts, and a cross-family chain plans and trains."""
from __future__ import annotations

import json

import pytest
import torch

from compressor.checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_model, meta_for, save_checkpoint
from compressor.config import DistillConfig, resolve_config
from compressor.data import synthetic_data
from compressor.models import create_model
from compressor.pipeline import run_distillation
from compressor.planning import plan_chain

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

# The smallest member of each family: depthwise convs, hardswish, SiLU, squeeze-excitation, channel shuffle.
# The dynamo exporter takes 5-15 s per model on 2 cores, so it runs for the two families with the rarest
# operators (False = the family's default path: TorchScript for MobileNetV3, whose dynamo graph OpenCV DNN
# computes wrongly, dynamo for ShuffleNetV2; export/onnx_export.FAMILY_EXPORTER); the others use the
# TorchScript exporter (--legacy). Every family's default path in every runtime: tests/test_runtime_parity.py.
SMALLEST = {"mobilenetv2_035": True, "mobilenetv3_small_050": False, "efficientnet_b0": True,
            "shufflenetv2_x0_5": False, "regnety_400mf": True, "resnet10": True}


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_each_family_exports_to_onnx_with_parity(name, tmp_path):
    import onnx

    from export.onnx_export import export_onnx
    from export.validate import validate_onnx

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, stem="cifar").eval()
    # BatchNorm statistics away from the identity, so that parity checks real folding
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    meta = meta_for(name, num_classes=10, model_kwargs={"stem": "cifar"}, input_size=(3, 32, 32))
    path = export_onnx((model, meta), tmp_path / f"{name}.onnx", legacy=SMALLEST[name])
    report = validate_onnx(path, model, meta, batch_sizes=(1, 3), threads=1)
    assert report.passed, report.summary()
    proto = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert not list(tmp_path.glob("*.data"))  # self-contained: no external weight files


def test_import_torchvision_state_dict_with_imagenet_normalisation(in_tmp, capsys):
    from compressor.cli import main

    ref = create_model("shufflenetv2_x0_5", num_classes=1000)  # torchvision's layout, key for key
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, "tv.pth")
    with pytest.raises(SystemExit) as exc:
        main(["import", "tv.pth", "--arch", "shufflenetv2_x0_5", "--out", "t.safetensors"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "normalisation: ImageNet mean/std, the default for shufflenetv2" in out
    model, meta = load_model("t.safetensors")
    assert meta.num_classes == 1000 and tuple(meta.mean) == IMAGENET_MEAN and tuple(meta.std) == IMAGENET_STD
    assert meta.input_size == (3, 224, 224) and meta.model_kwargs == {}
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_cross_family_chain_plans_and_trains_a_step(tmp_path, monkeypatch):
    """CIFAR ResNet-56 teacher -> MobileNetV3-small student; assistants from the student's family by MACs."""
    monkeypatch.setattr("compressor.pipeline.write_report", lambda run_dir: None)
    plan = plan_chain("resnet56", 10, "mobilenetv3_small_050", measure_latency=False, input_size=(3, 32, 32))
    names = [m.arch for m in plan.members]
    assert names[0] == "resnet56" and names[-1] == "mobilenetv3_small_050"
    assert len(names) > 2 and all(n.startswith("mobilenetv3_") for n in names[1:])
    assert all(m.model_kwargs == {"stem": "cifar"} for m in plan.members[1:])  # 32 px: the cifar stem
    macs = [m.macs for m in plan.members]
    assert macs == sorted(macs, reverse=True)

    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, create_model("resnet56"), meta_for("resnet56", num_classes=10))
    cfg = resolve_config(DistillConfig, None, {
        "teacher": str(teacher), "target": "mobilenetv3_small_050", "assistants": "mobilenetv3_small_075",
        "epochs": 1, "batch_size": 16, "latency_backend": "none", "out": str(tmp_path / "run"), "augment": False})
    summary = run_distillation(cfg, data=synthetic_data(n_train=16, n_test=16), show_progress=False)
    assert [m["arch"] for m in summary["chain"]] == ["resnet56", "mobilenetv3_small_075", "mobilenetv3_small_050"]
    student, meta = load_model(tmp_path / "run" / "student.safetensors")
    assert meta.model_kwargs == {"stem": "cifar"} and meta.input_size == (3, 32, 32)
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["chain"][1]["model_kwargs"] == {"stem": "cifar"}


def test_train_picks_the_stem_from_the_image_size_and_records_it(tmp_path, capsys):
    from compressor.config import TrainConfig
    from compressor.pipeline import train_model

    cfg = resolve_config(TrainConfig, None, {"arch": "shufflenetv2_x0_5", "out": str(tmp_path / "g.safetensors"),
                                             "epochs": 1, "batch_size": 8, "augment": False})
    gray = synthetic_data(num_classes=3, input_size=(1, 32, 32), n_train=8, n_test=8)
    train_model(cfg, data=gray, show_progress=False)
    assert "stem: cifar for 32 px images" in capsys.readouterr().out
    model, meta = load_model(tmp_path / "g.safetensors")
    assert meta.model_kwargs == {"stem": "cifar"} and meta.input_size == (1, 32, 32) and meta.in_chans == 1
    assert model.conv1[0].in_channels == 1 and model.conv1[0].stride == (1, 1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_target_latency_picks_from_another_family(monkeypatch):
    """--target-latency --target-family: the largest member of that family (smaller than the teacher) that fits."""
    from compressor.checkpoint import CheckpointMeta
    from compressor.pipeline import _resolve_target

    measured = []

    def fake_latency(arch, backend="torch", num_classes=10, model_kwargs=None, input_size=None):
        from compressor.planning import profile_arch

        measured.append((arch, dict(model_kwargs or {}), tuple(input_size)))
        return profile_arch(arch, num_classes, model_kwargs, input_size)[1] / 1e8  # 10 M MACs = 0.1 ms

    monkeypatch.setattr("compressor.latency.latency_ms", fake_latency)
    tmeta = CheckpointMeta(arch="resnet56", num_classes=10, input_size=(3, 32, 32))
    cfg = resolve_config(DistillConfig, None, {"teacher": "t.safetensors", "target_latency_ms": 0.2,
                                               "target_family": "mobilenetv3"})
    # every candidate is measured at the teacher's 32 px with the cifar stem; the fake latency grows with MACs
    arch = _resolve_target(cfg, tmeta)
    assert arch.startswith("mobilenetv3_")
    assert all(kw == {"stem": "cifar"} and size == (3, 32, 32) for _, kw, size in measured)
    calls = list(measured)
    fits = [a for a, kw, size in calls if fake_latency(a, model_kwargs=kw, input_size=size) <= 0.2]
    assert arch == fits[-1] and len(fits) < len(calls)
    with pytest.raises(Exception, match="only applies with --target-latency"):
        resolve_config(DistillConfig, None, {"teacher": "t", "target": "resnet8", "target_family": "mobilenetv3"})
