"""Execution providers: availability with its fix, the session set-up, and the
``compress bench --provider all`` table (CPU always; OpenVINO/CUDA where usable)."""
from __future__ import annotations

import sys

import pytest
import torch

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.data import synthetic_data
from compressor.errors import CompressError
from compressor.models import create_model
from conftest import run_export_cli
from export import OnnxModel, export_onnx, quantize_static_int8
from export.provider_table import format_provider_table, provider_table
from export.providers import OPENVINO_INSTALL, check_precision, unavailable_reason
from export.quantize import calibration_images, int8_path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("providers")
    torch.manual_seed(0)
    meta = meta_for("cnn2", num_classes=10)
    ckpt = save_checkpoint(tmp / "m.safetensors", create_model("cnn2", num_classes=10).eval(), meta)
    fp32 = export_onnx(ckpt, tmp / "m.onnx")
    data = synthetic_data(n_train=32, n_test=48, seed=4)
    int8 = quantize_static_int8(fp32, int8_path(fp32), calibration_images(data, 32))
    return fp32, int8, data


@pytest.fixture
def no_openvino(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # import fails: not installed


def test_missing_openvino_names_the_install(no_openvino):
    assert unavailable_reason("openvino") == (
        f"the OpenVINO execution provider is not installed; {OPENVINO_INSTALL}")
    assert unavailable_reason("openvino") is not None and unavailable_reason("cpu") is None


def test_unknown_provider_and_precision_rules():
    assert unavailable_reason("cpu") is None
    assert "use one of cpu, openvino, cuda" in unavailable_reason("tpu")
    assert check_precision("openvino", "BF16") == "bf16"
    with pytest.raises(CompressError, match="bf16 is an OpenVINO hint"):
        check_precision("cpu", "bf16")
    with pytest.raises(CompressError, match="use one of f32, bf16"):
        check_precision("openvino", "fp8")


def test_unavailable_provider_is_exit_2_with_the_fix(files, no_openvino):
    res = run_export_cli("bench", files[0], "--provider", "openvino", "--iters", "2")
    assert isinstance(res.exception, CompressError) and OPENVINO_INSTALL in str(res.exception)
    if unavailable_reason("cuda"):
        res = run_export_cli("bench", files[0], "--provider", "cuda", "--iters", "2")
        assert isinstance(res.exception, CompressError) and "onnxruntime-gpu" in str(res.exception)


def test_provider_table_on_cpu(files, no_openvino):
    fp32, int8, data = files
    rep = provider_table(fp32, batch_sizes=(1, 4), threads=1, iters=3, seconds=None, warmup=1, data=data,
                         parity_images=48)
    rows = {(r["provider"], r["variant"], r["batch_size"]): r for r in rep["rows"]}
    assert rep["int8"] == str(int8)  # NAME.int8.onnx beside the model is picked up
    for b in (1, 4):
        ref = rows[("cpu", "fp32", b)]
        assert ref["max_abs_diff"] == 0.0 and ref["top1_agreement"] == 1.0 and ref["parity_passed"]
        assert ref["p50_speedup_vs_cpu_fp32"] == 1.0 and ref["throughput_vs_cpu_fp32"] == 1.0
        q = rows[("cpu", "int8", b)]
        assert q["parity_passed"] == (q["top1"] >= rep["reference_top1"] - 0.5)
    assert rep["parity_source"] == "data" and rep["parity_inputs"] == 48
    assert OPENVINO_INSTALL in rep["unavailable"]["openvino"]
    assert not any(p == "openvino" for p, _, _ in rows)
    for b, best in rep["fastest"].items():
        passing = [r for r in rep["rows"] if r["batch_size"] == int(b) and r["parity_passed"]]
        assert best["p50_ms"] == min(r["p50_ms"] for r in passing)
    text = format_provider_table(rep)
    assert "fastest at batch 1 that passes parity" in text and "openvino: not available" in text


def test_bench_all_through_the_cli(files, tmp_path, no_openvino):
    import json

    res = run_export_cli("bench", files[0], "--provider", "all", "--batch-size", "1", "--iters", "2",
                         "--warmup", "1", "--threads", "1", "--json", tmp_path / "all.json")
    assert res.exit_code == 0, res.output
    assert "cpu       fp32      1" in res.output and "cpu       int8      1" in res.output
    rep = json.loads((tmp_path / "all.json").read_text())
    assert {r["variant"] for r in rep["rows"]} == {"fp32", "int8"} and rep["parity_source"] == "random"


@pytest.mark.parametrize("args,message", [
    (("--provider", "all", "--torch"), "--provider all prints the provider table only"),
    (("--precision", "bf16"), "add --provider openvino"),
    (("--data", "demo"), "--data is for --provider all"),
])
def test_bench_provider_option_errors(files, args, message):
    res = run_export_cli("bench", files[0], *args)
    assert isinstance(res.exception, CompressError) and message in str(res.exception), res.output


def test_session_records_precision(files):
    m = OnnxModel(files[0], threads=1, providers="cpu")
    assert m.precision == "f32" and m.active_providers == ["CPUExecutionProvider"]
