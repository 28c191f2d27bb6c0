"""ONNX export, parity validation, the runtime wrapper, INT8 and the export command.

Models are small and exports are shared per module, so the file runs in well
under a minute on two cores.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.checkpoint import IMAGENET_MEAN, IMAGENET_STD, file_sha256, load_model, meta_for, save_checkpoint
from compressor.data import normalize, synthetic_data
from compressor.errors import CheckFailed, CompressError
from compressor.models import create_model
from export import (METADATA_KEYS, OnnxModel, evaluate_onnx, export_onnx, int8_report, invalid_path,
                    quantize_static_int8, resolve_checkpoint, validate_onnx)
from conftest import run_export_cli as _cli
from export.quantize import calibration_images


def _model(arch, seed=0, **meta_kw):
    torch.manual_seed(seed)
    meta = meta_for(arch, num_classes=10, **meta_kw)
    model = create_model(arch, num_classes=10, **meta.model_kwargs).eval()
    return model, meta




@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def cnn2_ckpt(tmp):
    model, meta = _model("cnn2", class_names=[f"c{i}" for i in range(10)])
    return save_checkpoint(tmp / "cnn2.safetensors", model, meta)


@pytest.fixture(scope="module")
def cnn2(tmp, cnn2_ckpt):
    """cnn2 exported once from its checkpoint, plain and with folded preprocessing (shared by tests)."""
    model, meta = load_model(cnn2_ckpt)
    plain = export_onnx(cnn2_ckpt, tmp / "cnn2.onnx")
    folded = export_onnx((model, meta), tmp / "cnn2_folded.onnx", include_preprocessing=True)
    return model, meta, plain, folded


def _copy(src, dst):
    shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------- parity per family
def _check_round_trip(model, meta, out):
    report = validate_onnx(out, model, meta)
    assert report.passed and report.top1_agreement == 1.0
    assert report.tolerance_ratio <= 1.0  # every logit within atol + rtol * |ref|
    assert 2 not in report.batch_sizes and {1, 7} <= set(report.batch_sizes)
    # dynamic batch axis: any batch size runs and matches PyTorch
    sess = OnnxModel(out, threads=1)
    x = np.random.default_rng(1).standard_normal((5, *meta.input_size), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.predict(x), ref, atol=1e-4, rtol=1e-3)
    assert sess.input_name == "input" and sess.output_name == "logits"
    assert sess.input_shape == tuple(meta.input_size)


@pytest.mark.parametrize("arch,kw", [
    ("resnet8", {}),
    ("wrn16_1", {}),
    ("vgg8", {}),
    ("resnet18", {"input_size": (3, 64, 64), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
])
def test_export_round_trips_with_parity(tmp, arch, kw):
    model, meta = _model(arch, **kw)
    _check_round_trip(model, meta, export_onnx((model, meta), tmp / f"{arch}.onnx"))


def test_export_round_trips_with_parity_cnn2(cnn2):
    model, meta, plain, _ = cnn2
    _check_round_trip(model, meta, plain)


def test_legacy_exporter(tmp):
    model, meta = _model("cnn2")
    out = export_onnx((model, meta), tmp / "legacy.onnx", legacy=True)
    assert validate_onnx(out, model, meta).passed
    assert "TorchScript" in OnnxModel(out, threads=1).metadata["exporter"]


def test_include_preprocessing_parity(tmp):
    model, meta = _model("resnet8", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = export_onnx((model, meta), tmp / "r8_pre.onnx", include_preprocessing=True)
    report = validate_onnx(out, model, meta)
    assert report.passed and report.preprocessing == "normalize"
    sess = OnnxModel(out, threads=1)
    assert sess.preprocessing == "normalize"
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        ref = model(normalize(images, meta.mean, meta.std)).numpy()
    raw = images.numpy().astype(np.float32) / 255.0
    np.testing.assert_allclose(sess.predict(raw), ref, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(sess.predict_images(images.numpy()), ref, atol=1e-4, rtol=1e-3)


def test_metadata_props(tmp, cnn2_ckpt, cnn2):
    out = cnn2[2]
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert set(METADATA_KEYS) <= set(props)
    assert props["arch"] == "cnn2" and props["num_classes"] == "10" and props["in_chans"] == "3"
    assert json.loads(props["input_size"]) == [3, 32, 32]
    assert json.loads(props["class_names"]) == [f"c{i}" for i in range(10)]
    assert json.loads(props["model_kwargs"]) == {}
    assert props["source_sha256"] == file_sha256(cnn2_ckpt)
    assert (out.parent / props["source_checkpoint"]).resolve() == cnn2_ckpt.resolve()
    opset = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")][0]
    assert props["opset"] == str(opset)
    assert "dynamo" in props["exporter"] and props["preprocessing"] == "none"
    assert [i.name for i in proto.graph.input] == ["input"] and proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert not list(tmp.glob("*.data"))  # one self-contained file
    meta = OnnxModel(out, threads=1).meta
    assert meta.arch == "cnn2" and tuple(meta.mean) == pytest.approx(json.loads(props["mean"]))


def test_explicit_opset(tmp):
    model, meta = _model("cnn2")
    with pytest.raises(CompressError):
        export_onnx((model, meta), tmp / "bad.onnx", example_batch=1)
    with pytest.raises(CompressError, match="--legacy"):
        export_onnx((model, meta), tmp / "opset13.onnx", opset=13, exporter="dynamo")  # below what dynamo reaches
    assert not (tmp / "opset13.onnx").exists()
    old = export_onnx((model, meta), tmp / "opset13.onnx", opset=13, legacy=True)
    assert OnnxModel(old, threads=1).metadata["opset"] == "13" and validate_onnx(old, model, meta).passed


# ------------------------------------------------------------------ failing validation
def test_corrupted_weight_fails_validation(tmp, cnn2):
    model, meta, plain, _ = cnn2
    out = _copy(plain, tmp / "corrupt.onnx")
    proto = onnx.load(str(out))
    init = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    w = numpy_helper.to_array(init).copy()
    w[0] *= 3.0  # one conv filter changed
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(out))
    with pytest.raises(CheckFailed) as err:
        validate_onnx(out, model, meta)
    assert "max|diff|" in str(err.value) and "agreement" in str(err.value)
    assert not out.exists() and invalid_path(out).exists()
    assert invalid_path(out).name == "corrupt.invalid.onnx"


def test_checker_rejects_broken_graph(tmp, cnn2):
    model, meta, plain, _ = cnn2
    out = _copy(plain, tmp / "broken.onnx")
    proto = onnx.load(str(out))
    proto.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(proto, str(out))
    with pytest.raises(CheckFailed, match="checker"):
        validate_onnx(out, model, meta)
    assert (tmp / "broken.invalid.onnx").exists()


# ------------------------------------------------------------------------ bad input
def test_bad_paths_give_compress_error(tmp):
    empty = tmp / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp / "notes.onnx"
    text.write_text("this is not a protobuf\n" * 10)
    for bad in (tmp / "missing.onnx", empty, text, tmp):
        with pytest.raises(CompressError):
            OnnxModel(bad)
        with pytest.raises(CompressError):
            evaluate_onnx(bad, synthetic_data())
    with pytest.raises(CompressError):
        export_onnx(tmp / "missing.safetensors", tmp / "x.onnx")
    with pytest.raises(CompressError):
        export_onnx(text, tmp / "x.onnx")  # not a safetensors file
    with pytest.raises(CompressError):
        resolve_checkpoint(tmp)  # a folder without student.safetensors
    model, meta = _model("cnn2")
    with pytest.raises(CompressError):
        export_onnx((model, meta), tmp / "no_such_dir" / "x.onnx")


# ---------------------------------------------------------------------- evaluation
def test_evaluate_onnx_and_preprocessing_flag(cnn2):
    model, meta, plain, folded = cnn2
    data = synthetic_data(n_test=40)
    a = evaluate_onnx(plain, data, batch_size=16)
    b = evaluate_onnx(folded, data, batch_size=7)
    assert set(a) == {"top1", "top5", "loss", "n", "sha256", "source"} and a["n"] == 40
    assert a["top1"] == pytest.approx(b["top1"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    with torch.inference_mode():
        logits = model(normalize(data.test.images, meta.mean, meta.std))
    ref_top1 = 100.0 * (logits.argmax(1) == data.test.labels).float().mean().item()
    ref_loss = torch.nn.functional.cross_entropy(logits, data.test.labels).item()
    assert a["top1"] == pytest.approx(ref_top1) and a["loss"] == pytest.approx(ref_loss, rel=1e-4)
    with pytest.raises(CompressError, match=r"\(3, 32, 32\).*\(3, 16, 16\)"):
        evaluate_onnx(plain, synthetic_data(input_size=(3, 16, 16)))
    with pytest.raises(CompressError, match="classes"):
        evaluate_onnx(plain, synthetic_data(num_classes=5))


def test_validate_on_real_images(cnn2):
    model, meta, plain, folded = cnn2
    for path in (plain, folded):
        report = validate_onnx(path, model, meta, data=synthetic_data(), data_label="synthetic")
        assert report.passed and report.inputs == "data:synthetic" and report.n == 32


# --------------------------------------------------------------------------- INT8
def _sanity_train(model, data, meta, steps=20):
    x = normalize(data.train.images, meta.mean, meta.std)
    y = data.train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_int8_quantisation_reports_both_accuracies(tmp):
    data = synthetic_data(n_train=128, n_test=64)
    model, meta = _model("cnn2")
    model = _sanity_train(model, data, meta)
    fp32 = export_onnx((model, meta), tmp / "q.onnx")
    int8 = quantize_static_int8(fp32, tmp / "q.int8.onnx", calibration_images(data, 64))
    sess = OnnxModel(int8, threads=1)
    assert sess.metadata["quantization"].startswith("int8") and sess.metadata["arch"] == "cnn2"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    rep = int8_report(fp32, int8, data, threads=1, iters=10, seconds=None, warmup=1)
    assert rep["fp32"]["top1"] >= 80.0  # the sanity-trained model learned the synthetic classes
    assert rep["int8"]["top1"] >= rep["fp32"]["top1"] - 10.0
    assert rep["int8"]["n"] == rep["fp32"]["n"] == 64
    assert rep["speedup"]["1"] > 0 and rep["int8"]["size_bytes"] < rep["fp32"]["size_bytes"]


# ----------------------------------------------------------------------------- CLI
def test_cli_export_and_errors(tmp, cnn2_ckpt):
    run = tmp / "run"
    run.mkdir()
    (run / "student.safetensors").write_bytes(cnn2_ckpt.read_bytes())
    res = _cli("export", "--onnx", run)
    assert res.exit_code == 0, res.output
    assert (run / "student.onnx").exists()
    assert "parity PASS" in res.output and "exported" in res.output

    res = _cli("export", "--onnx", cnn2_ckpt, "--out", tmp / "cli_pre.onnx", "--include-preprocessing",
               "--no-validate", "--opset", "18")
    assert res.exit_code == 0, res.output
    assert "validation skipped" in res.output
    pre = OnnxModel(tmp / "cli_pre.onnx", threads=1)
    assert pre.metadata["opset"] == "18" and pre.preprocessing == "normalize"

    for args in (("export", "--onnx", tmp / "missing.safetensors"),
                 ("export", "--onnx", cnn2_ckpt, "--quantize", "int8"),          # needs --data
                 ("export", "--onnx", cnn2_ckpt, "--out", tmp / "nodir" / "x.onnx"),
                 ("export", "--onnx", cnn2_ckpt, "--min-agreement", "150")):
        res = _cli(*args)
        assert isinstance(res.exception, CompressError), (args, res.output, res.exception)


def test_cli_export_parity_failure_is_checkfailed(tmp):
    # atol = rtol = 0 demands bit-exact logits, which two runtimes do not give:
    # the parity check fails, the command raises CheckFailed (exit 1) and the
    # file is moved aside.
    model, meta = _model("cnn2", seed=3)
    ck = save_checkpoint(tmp / "tight.safetensors", model, meta)
    res = _cli("export", "--onnx", ck, "--atol", "0", "--rtol", "0")
    if res.exception is None:  # bit-exact by luck: nothing to check
        pytest.skip("export was bit-exact")
    assert isinstance(res.exception, CheckFailed), res.output
    assert "inf" in str(res.exception) or "tolerance" in str(res.exception)
    assert (tmp / "tight.invalid.onnx").exists() and not (tmp / "tight.onnx").exists()


def test_help_has_examples():
    for name in ("export", "bench"):
        res = _cli(name, "--help")
        assert res.exit_code == 0 and "Example:" in res.output
