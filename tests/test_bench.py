"""onnxruntime benchmark, its JSON report and the CI gates (budget, baseline, accuracy floor)."""
from __future__ import annotations

import copy
import json

import onnxruntime as ort
import pytest
import torch

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.errors import CheckFailed, CompressError
from compressor.models import create_model
from export import (OnnxModel, benchmark_onnx, check_accuracy_floor, check_baseline, check_budget, export_onnx,
                    format_table, parse_ratio, write_report)
from conftest import run_export_cli as _cli

FAST = dict(warmup=2, iters=12)




@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def onnx_file(tmp):
    torch.manual_seed(0)
    model = create_model("cnn2").eval()
    ckpt = save_checkpoint(tmp / "cnn2.safetensors", model, meta_for("cnn2", num_classes=10))
    return export_onnx(ckpt, tmp / "cnn2.onnx")


@pytest.fixture(scope="module")
def other_file(tmp):
    torch.manual_seed(1)
    model = create_model("cnn4").eval()
    return export_onnx((model, meta_for("cnn4", num_classes=10)), tmp / "cnn4.onnx")


@pytest.fixture(scope="module")
def report(onnx_file):
    return benchmark_onnx(onnx_file, batch_sizes=(1, 4), threads=1, **FAST)


def test_report_format(report, onnx_file):
    assert report["schema"] == "compress.bench/2"
    for key in ("cpu", "logical_cores", "platform"):
        assert key in report["machine"]
    for key in ("onnxruntime", "torch", "onnx", "python"):
        assert report["versions"][key]
    assert report["provider"] == "CPUExecutionProvider" and report["graph_optimization"] == "all"
    assert report["threads"] == 1 and report["warmup"] == 2 and report["iterations"] == 12
    assert report["batch_sizes"] == [1, 4] and report["timestamp"]
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert r["engine"] == "onnxruntime" and r["role"] == "model" and r["iterations"] == 12
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_ips"] == pytest.approx(1000 * r["batch_size"] / r["p50_ms"])  # one definition: batch / p50
        assert r["cv"] >= 0 and r["std_ms"] >= 0
    assert report["models"][0]["path"] == str(onnx_file) and report["models"][0]["arch"] == "cnn2"
    json.dumps(report)  # JSON-able as is
    table = format_table(report)
    assert "p50 ms" in table and "cnn2.onnx" in table


def test_threads_and_graph_opt_are_applied(onnx_file):
    m = OnnxModel(onnx_file, threads=1, graph_optimization="disable")
    opts = m.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rep = benchmark_onnx(onnx_file, threads=1, graph_optimization="basic", warmup=0, iters=3)
    assert rep["graph_optimization"] == "basic" and rep["threads"] == 1
    with pytest.raises(CompressError):
        benchmark_onnx(onnx_file, graph_optimization="max", iters=1)
    with pytest.raises(CompressError):
        benchmark_onnx(onnx_file, batch_sizes=(0,), iters=1)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_provider_unavailable_is_bad_input(onnx_file):
    with pytest.raises(CompressError, match="CUDA"):
        benchmark_onnx(onnx_file, providers="cuda", iters=1)


def test_torch_and_compare_in_one_run(onnx_file, other_file):
    torch.manual_seed(0)
    model = create_model("cnn2").eval()
    before = torch.get_num_threads()
    rep = benchmark_onnx(onnx_file, torch_model=model, compare=other_file, threads=1, **FAST)
    assert torch.get_num_threads() == before  # restored
    engines = {(r["role"], r["engine"]) for r in rep["results"]}
    assert engines == {("model", "onnxruntime"), ("compare", "onnxruntime"), ("torch", "torch")}
    baselines = {c["baseline"] for c in rep["comparisons"]}
    assert baselines == {"torch", "compare"}
    for c in rep["comparisons"]:
        assert c["p50_speedup"] > 0 and c["batch_size"] == 1
    assert rep["torch_threads"] == 1


def test_time_budget_instead_of_iters(onnx_file):
    rep = benchmark_onnx(onnx_file, threads=1, warmup=1, seconds=0.05)
    assert rep["results"][0]["iterations"] >= 10 and rep["seconds"] == 0.05 and rep["iterations"] is None


# -------------------------------------------------------------------------- gates
def test_budget_gate(report):
    rep = copy.deepcopy(report)
    gates = check_budget(rep, 1e6, "p99")
    assert all(g["passed"] for g in gates) and len(gates) == 2
    with pytest.raises(CheckFailed, match="budget"):
        check_budget(rep, 1e-6, "p50")
    assert [g["passed"] for g in rep["gates"]] == [True, True, False, False]
    with pytest.raises(CompressError):
        check_budget(rep, -1)
    with pytest.raises(CompressError):
        check_budget(rep, 1.0, "p42")


def test_baseline_gate(report, tmp):
    rep = copy.deepcopy(report)
    assert all(g["passed"] for g in check_baseline(rep, copy.deepcopy(report), "10%"))
    faster = copy.deepcopy(report)
    for r in faster["results"]:
        for p in ("p50", "p90", "p99", "mean"):
            r[f"{p}_ms"] /= 10.0
    path = tmp / "faster.json"
    path.write_text(json.dumps(faster))
    with pytest.raises(CheckFailed, match="baseline"):
        check_baseline(rep, path, 0.10, "p90")
    # ... but passes when the allowed regression covers the gap
    assert all(g["passed"] for g in check_baseline(copy.deepcopy(report), path, "1000%"))


def test_baseline_errors(report, tmp):
    bad = tmp / "bad.json"
    bad.write_text("{not json")
    noresults = tmp / "noresults.json"
    noresults.write_text(json.dumps({"schema": "x"}))
    other_batch = copy.deepcopy(report)
    other_batch["results"] = [r for r in other_batch["results"] if r["batch_size"] == 4]
    other = tmp / "other_batch.json"
    other.write_text(json.dumps(other_batch))
    missing_key = copy.deepcopy(report)
    del missing_key["results"][0]["p50_ms"]
    for baseline in (bad, noresults, other, tmp / "missing.json", missing_key):
        with pytest.raises(CompressError):
            check_baseline(copy.deepcopy(report), baseline, "10%")


def test_parse_ratio():
    assert parse_ratio("10%") == pytest.approx(0.10)
    assert parse_ratio("0.25") == pytest.approx(0.25)
    assert parse_ratio(0.05) == pytest.approx(0.05)
    # a ratio the CLI already parsed ("150%") passes through check_baseline's second parse
    assert parse_ratio(parse_ratio("150%")) == pytest.approx(1.5)
    for bad in ("10", "ten", "-5%", float("inf"), -0.1):
        with pytest.raises(CompressError):
            parse_ratio(bad)


def test_accuracy_floor():
    assert "PASS" in check_accuracy_floor(91.2, 90)
    with pytest.raises(CheckFailed, match="89.00"):
        check_accuracy_floor(89.0, 90)
    with pytest.raises(CompressError):
        check_accuracy_floor(89.0, 190)


def test_write_report(report, tmp):
    out = write_report(report, tmp / "r.json")
    assert json.loads(out.read_text())["schema"] == "compress.bench/2"
    assert not [p for p in tmp.iterdir() if p.name.startswith(".r.json")]  # no temp file left behind


# ---------------------------------------------------------------------------- CLI
def test_cli_bench_gates(onnx_file, report, tmp):
    out = tmp / "cli.json"
    res = _cli("bench", onnx_file, "--threads", "1", "--warmup", "2", "--iters", "12", "--batch-size", "1",
               "--budget-ms", "100000", "--json", out)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["gates"][0]["passed"] and "latency budget PASS" in res.output

    res = _cli("bench", onnx_file, "--threads", "1", "--iters", "5", "--budget-ms", "0.000001",
               "--percentile", "p90", "--json", out)
    assert isinstance(res.exception, CheckFailed)
    assert json.loads(out.read_text())["gates"][0]["passed"] is False  # report written before failing

    slow = copy.deepcopy(report)
    for r in slow["results"]:
        r["p50_ms"] *= 1000.0
    slow_path = tmp / "slow.json"
    slow_path.write_text(json.dumps(slow))
    res = _cli("bench", onnx_file, "--threads", "1", "--iters", "5", "--baseline", slow_path,
               "--max-regression", "10%")
    assert res.exit_code == 0, res.output
    assert "baseline gate PASS" in res.output

    fast = copy.deepcopy(report)
    for r in fast["results"]:
        r["p50_ms"] /= 1000.0
    fast_path = tmp / "fast.json"
    fast_path.write_text(json.dumps(fast))
    res = _cli("bench", onnx_file, "--threads", "1", "--iters", "5", "--baseline", fast_path)
    assert isinstance(res.exception, CheckFailed)


def test_cli_bench_torch_and_errors(onnx_file, other_file, tmp):
    res = _cli("bench", onnx_file, "--torch", "--threads", "1", "--iters", "5", "--warmup", "1")
    assert res.exit_code == 0, res.output
    assert "torch eager" in res.output

    bad = tmp / "garbage.json"
    bad.write_text("[]")
    for args in (("bench", tmp / "nope.onnx"),
                 ("bench", onnx_file, "--max-regression", "10%"),           # needs --baseline
                 ("bench", onnx_file, "--baseline", bad),                    # not a bench report
                 ("bench", onnx_file, "--iters", "3", "--seconds", "1"),
                 ("bench", onnx_file, "--batch-size", "0"),
                 ("bench", onnx_file, "--budget-ms", "-3"),
                 ("bench", other_file, "--torch")):                          # no checkpoint to find
        res = _cli(*args)
        assert isinstance(res.exception, CompressError), (args, res.output, res.exception)
