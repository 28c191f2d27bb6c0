"""Export parity beyond onnxruntime: OpenVINO (f32) and OpenCV DNN, the exporter chosen per family,
and ``--opset 17`` (issue 21).

The runtime checks need the optional ``runtimes`` extra (``pip install -e '.[runtimes]'``; ``make test``
installs it) and are skipped only when its packages are absent.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from compressor.bn_recalibration import recalibrate_bn
from compressor.checkpoint import meta_for
from compressor.errors import CheckFailed, CompressError
from compressor.models import create_model
from compressor.models.registry import family_ladder, get_entry, list_families
from export import parity
from export.onnx_export import FAMILY_EXPORTER, export_onnx, exporter_plan, main_opset
from export.runtime import OnnxModel
from export.validate import validate_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

N_IMAGES = 256
BATCHES = (32,) * (N_IMAGES // 32)  # few images per forward, every runtime on the same batches
INSTALLED = parity.installed_runtimes()
needs_runtimes = pytest.mark.skipif(not INSTALLED, reason="neither openvino nor opencv-python is installed "
                                                          "(pip install -e '.[runtimes]')")
needs_opencv = pytest.mark.skipif("opencv" not in INSTALLED, reason="opencv-python is not installed")


def _smallest_per_family() -> list[str]:
    return [family_ladder(f)[0] for f in list_families()]


def _prepared(name: str, size: int = 32):
    """The family's smallest member at its small input size (``stem=cifar`` where it has stems), with
    non-degenerate outputs: classifier layers at PyTorch's default init (torchvision's N(0, 0.01) heads give
    logits tied to 1e-6) and BatchNorm statistics from 64 demo training images (random running statistics
    make every input predict the same class)."""
    from compressor.data.formats import decode_demo
    from compressor.data.sampling import spread_indices

    stems = "stem" in inspect.signature(get_entry(name).builder).parameters
    kw = {"stem": "cifar"} if stems else {}
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    meta = meta_for(name, num_classes=10, model_kwargs=kw, input_size=(3, size, size))
    (train_x, train_y), _ = decode_demo()[0]
    pick = torch.as_tensor(spread_indices(train_y, 64, 0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (meta.mean, meta.std))
    x = (train_x[pick].float() / 255 - mean) / std
    recalibrate_bn(model, [x[:32], x[32:]])
    # Centre and scale the last layer on those images: logits of unit spread per class, so the predictions
    # spread over the classes (the pooled features share a large mean that otherwise picks one class).
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = []
    hook = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.inference_mode():
        model.eval()(x)
    hook.remove()
    with torch.no_grad():
        out = seen[0] @ head.weight.T
        head.weight /= out.std(0, keepdim=True).T.clamp_min(1e-6)
        head.bias.copy_(-(seen[0] @ head.weight.T).mean(0))
    return model.eval(), meta


def test_exporter_plan_per_family():
    assert [p for p, _ in exporter_plan("mobilenetv3_small_050")] == ["legacy", "dynamo"]
    assert [p for p, _ in exporter_plan("shufflenetv2_x0_5")] == ["dynamo", "legacy"]
    assert [p for p, _ in exporter_plan("resnet8")] == ["dynamo", "legacy"]
    assert [p for p, _ in exporter_plan("examples/my_model.py:MyNet")] == ["dynamo", "legacy"]  # never imported
    # below opset 18 dynamo can only convert down (and mostly fails): TorchScript first
    assert [p for p, _ in exporter_plan("resnet8", opset=17)] == ["legacy", "dynamo"]
    assert "opset 17" in exporter_plan("resnet8", opset=17)[0][1]
    assert exporter_plan("resnet8", exporter="dynamo") == [("dynamo", "dynamo requested")]
    assert "mobilenetv3 family" in exporter_plan("mobilenetv3_large_100")[0][1]
    with pytest.raises(CompressError, match="exporter must be one of"):
        exporter_plan("resnet8", exporter="torchscript")


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "mobilenetv3_small_050"])
def test_opset_17_exports_by_default(name, tmp_path):
    """Issue 21: '--opset 17' failed for these (dynamo cannot convert Pad/ReduceMean below 18)."""
    model, meta = _prepared(name)
    path = export_onnx((model, meta), tmp_path / "m.onnx", opset=17)
    props = OnnxModel(path, threads=1).metadata
    assert props["opset"] == "17" and "TorchScript" in props["exporter"]
    assert props["exporter_choice"].startswith("auto (")
    assert validate_onnx(path, model, meta, batch_sizes=(1, 5), threads=1).passed
    if name == "resnet8":  # asking for dynamo still says why it cannot (one model: a dynamo export takes 5-20 s)
        with pytest.raises(CompressError, match="could not produce opset 17"):
            export_onnx((model, meta), tmp_path / "d.onnx", opset=17, exporter="dynamo")


def test_resolve_runtimes(monkeypatch):
    assert parity.resolve_runtimes("onnxruntime") == [] and parity.resolve_runtimes(()) == []
    assert parity.resolve_runtimes("installed") == parity.installed_runtimes()
    with pytest.raises(CompressError, match="unknown runtime 'tensorrt'"):
        parity.resolve_runtimes("openvino,tensorrt")
    monkeypatch.setattr(parity.importlib.util, "find_spec", lambda name: None)  # nothing optional installed
    assert parity.installed_runtimes() == [] and parity.resolve_runtimes(None) == []
    with pytest.raises(CompressError, match=r"'openvino' is not installed; pip install 'compress\[runtimes\]'"):
        parity.resolve_runtimes("openvino")


@needs_opencv
def test_a_runtime_that_disagrees_fails_the_check(tmp_path):
    """The issue's case: the dynamo MobileNetV3 graph is right in onnxruntime and OpenVINO, wrong in OpenCV."""
    model, meta = _prepared("mobilenetv3_small_050")
    path = export_onnx((model, meta), tmp_path / "m.onnx", exporter="dynamo")
    with pytest.raises(CheckFailed, match=r"runtime opencv 5[\d.]*: DISAGREES .*--runtimes") as exc:
        validate_onnx(path, model, meta, batch_sizes=(4, 4), threads=1)
    assert "runtime openvino" not in str(exc.value)  # OpenVINO agrees; only the OpenCV rows fail
    assert (tmp_path / "m.invalid.onnx").exists()
    report = validate_onnx(tmp_path / "m.invalid.onnx", model, meta, batch_sizes=(4, 4), threads=1,
                           runtimes=[r for r in INSTALLED if not r.startswith("opencv")], rename_invalid=False)
    assert report.passed  # checking only the runtimes one deploys with passes


@needs_runtimes
@pytest.mark.parametrize("name", _smallest_per_family())
def test_every_family_default_export_agrees_in_every_installed_runtime(name, tmp_path):
    """Issue 21, done-when: each zoo family's default export agrees with onnxruntime (and PyTorch) in
    OpenVINO f32 and OpenCV DNN, >= 99 % top-1 on 256 demo test images."""
    model, meta = _prepared(name)
    path = export_onnx((model, meta), tmp_path / f"{name}.onnx")
    props = OnnxModel(path, threads=1).metadata
    family = get_entry(name).family
    expected = FAMILY_EXPORTER.get(family, ("dynamo",))[0]
    assert ("TorchScript" if expected == "legacy" else "dynamo") in props["exporter"], props["exporter"]
    assert family in props["exporter_choice"]

    # the criterion is top-1 agreement; atol 1e-3 keeps the logit check from depending on the CPU's kernels
    # (logits here are ~1, the differences up to 1e-4 in onnxruntime and 5e-4 elsewhere)
    report = validate_onnx(path, model, meta, data="demo", batch_sizes=BATCHES, threads=1, min_agreement=0.99,
                           atol=1e-3)
    assert report.n == N_IMAGES and report.passed
    assert [r["runtime"] for r in report.runtimes] == INSTALLED
    assert all(r["passed"] and r["top1_agreement"] >= 0.99 for r in report.runtimes), report.summary()
    assert report.agreed_runtimes == ["onnxruntime", *INSTALLED]

    # the agreement is not trivial: the model tells the demo images apart, by margins far above the differences
    logits = _torch_logits(model, meta)
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert len(set(logits.argmax(1).tolist())) >= 4
    assert np.median(top2[:, 1] - top2[:, 0]) > 100 * max(r["max_abs_diff"] for r in report.runtimes)


def _torch_logits(model, meta) -> np.ndarray:
    from compressor.data.formats import decode_demo
    from compressor.data.sampling import spread_indices

    _, (test_x, test_y) = decode_demo()[0]
    x = test_x[torch.as_tensor(spread_indices(test_y, N_IMAGES, 0))].float() / 255
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.inference_mode():  # 64 of the 256 images (spread over the classes) tell enough, in one forward
        return model(x[::4]).numpy()


def test_cli_runtimes_option(tmp_path):
    from compressor.checkpoint import save_checkpoint
    from conftest import run_export_cli

    model, meta = _prepared("cnn2")
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    res = run_export_cli("export", tmp_path / "m.safetensors", "--runtimes", "tensorrt")
    assert res.exit_code == 2 or isinstance(res.exception, CompressError)
    assert not (tmp_path / "m.onnx").exists()
    res = run_export_cli("export", tmp_path / "m.safetensors", "--legacy", "--runtimes", ",".join(INSTALLED) or "onnxruntime")
    assert res.exit_code == 0, res.output
    assert "TorchScript exporter: legacy requested" in res.output
    for r in INSTALLED:
        assert f"{r} " in res.output.split("vs PyTorch in", 1)[1]
    assert main_opset(__import__("onnx").load(str(tmp_path / "m.onnx"))) == 17
