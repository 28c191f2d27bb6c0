"""The CI gates of export/gate.py: the interleaved latency gate's decision (bootstrap CI on
per-round ratios), graph cost counts, the baseline-context refusal, and the report schemas."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressor.errors import CheckFailed, CompressError
from conftest import run_export_cli as _cli
from export.gate import (SCHEMA, check_baseline_context, compare_cost, compare_latency, context_mismatch, decide,
                         graph_cost, report_context, run_context)


# ------------------------------------------------------------------ fixtures
def _init(name, shape, seed):
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, shape, data.ravel().tolist())


def _hand_graph(path, classes=5):
    """x[N,3,8,8] -> Conv(4x3x3x3, bias, pad 1) -> Relu -> depthwise Conv(4x1x3x3, group 4, pad 1)
    -> Flatten -> Gemm(10x256, transB, bias) -> MatMul(10 x classes) -> y[N,classes]."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=4),
        helper.make_node("Flatten", ["c2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "w4"], ["y"]),
    ]
    inits = [_init("w1", [4, 3, 3, 3], 0), _init("b1", [4], 1), _init("w2", [4, 1, 3, 3], 2),
             _init("w3", [10, 256], 3), _init("b3", [10], 4), _init("w4", [10, classes], 5)]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def hand(tmp):
    return _hand_graph(tmp / "hand.onnx")


@pytest.fixture(scope="module")
def hand_copy(tmp):
    return _hand_graph(tmp / "hand_copy.onnx")


# ------------------------------------------------------------- the decision
def test_decide_constant_ratio_gives_a_point_interval():
    base = [2.0, 4.0, 1.0, 3.0, 5.0]
    d = decide([1.2 * b for b in base], base, 0.10)
    assert d["ratio"] == pytest.approx(1.2) and d["ci_low"] == pytest.approx(1.2) and d["ci_high"] == pytest.approx(1.2)
    assert not d["passed"]
    assert d["message"] == "slowdown 1.20x [1.20, 1.20] 95% CI over 5 rounds; limit 1.10x: FAIL"
    d = decide([1.05 * b for b in base], base, "10%")
    assert d["passed"] and d["message"].endswith("limit 1.10x: pass")


def test_decide_fails_only_when_the_lower_bound_exceeds_the_limit():
    # median ratio 1.3 (> 1.1), but 3 of 7 rounds at 1.0: a resample of 7 rounds has >= 4 of them with
    # probability P(Bin(7, 3/7) >= 4) = 0.29 > 2.5%, so the lower bound is 1.0 -> pass.
    ratios = [1.0, 1.0, 1.0, 1.3, 1.3, 1.3, 1.3]
    d = decide(ratios, [1.0] * 7, 0.10)
    assert d["ratio"] == pytest.approx(1.3) and d["ci_low"] == pytest.approx(1.0)
    assert d["ci_high"] == pytest.approx(1.3) and d["passed"]


def test_decide_is_robust_to_outlier_rounds_and_seeded():
    # 12 clean rounds, 3 rounds where a neighbour hit the candidate 3x: P(Bin(15, 0.2) >= 8) = 0.4% < 2.5%,
    # so neither bound moves off 1.0.
    ratios = [1.0] * 12 + [3.0] * 3
    d = decide(ratios, [1.0] * 15, 0.10)
    assert (d["ratio"], d["ci_low"], d["ci_high"], d["passed"]) == (1.0, 1.0, 1.0, True)
    rng = np.random.default_rng(3)
    c, b = rng.uniform(1, 2, 15), rng.uniform(1, 2, 15)
    assert decide(c, b, seed=7) == decide(c, b, seed=7)
    assert decide(c, b)["ci_low"] <= decide(c, b)["ratio"] <= decide(c, b)["ci_high"]


@pytest.mark.parametrize("cand, base", [([1.0, 2.0], [1.0]), ([1.0], [1.0]), ([1.0, float("nan")], [1.0, 1.0]),
                                        ([1.0, 0.0], [1.0, 1.0]), ([1.0, 1.0], [1.0, -1.0])])
def test_decide_refuses_bad_samples(cand, base):
    with pytest.raises(CompressError):
        decide(cand, base)


# ---------------------------------------------------------------- graph cost
def test_graph_cost_of_a_hand_built_graph(hand):
    cost = graph_cost(hand)
    # conv 4x8x8 outputs x (3x3x3) = 6912; depthwise 4x8x8 x (1x3x3) = 2304; gemm 10 x 256 = 2560; matmul 5 x 10 = 50
    assert cost["macs"] == 6912 + 2304 + 2560 + 50 == 11826
    # 4*3*3*3 + 4 + 4*1*3*3 + 10*256 + 10 + 10*5
    assert cost["params"] == 108 + 4 + 36 + 2560 + 10 + 50 == 2768
    assert cost["nodes"] == 6 and cost["macs_unknown"] == 0
    assert cost["bytes"] == hand.stat().st_size


def test_graph_cost_of_a_tiny_exported_model(tmp):
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(256, 10)).eval()
    path = tmp / "tiny.onnx"
    torch.onnx.export(m, (torch.zeros(2, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    cost = graph_cost(path)
    assert cost["macs"] == 4 * 8 * 8 * 27 + 256 * 10 == 9472
    assert cost["params"] == sum(p.numel() for p in m.parameters()) == 2682
    assert cost["nodes"] == len(onnx.load(str(path)).graph.node)


def test_compare_cost_gate():
    base = {"macs": 100, "params": 10, "nodes": 4, "bytes": 1000}
    same = compare_cost(dict(base), base, "10%")
    assert same["passed"] and same["max_ratio"] == pytest.approx(1.1)
    grown = compare_cost({**base, "nodes": 5}, base, "10%")  # 4 -> 5 nodes: 1.25x
    assert not grown["passed"]
    assert [r["metric"] for r in grown["rows"] if not r["passed"]] == ["nodes"]
    assert compare_cost({**base, "nodes": 5}, base)["passed"]  # no limit: reported only


# ------------------------------------------------------ baseline context
def test_context_mismatch_names_the_fields():
    base = {"models": [{"role": "model", "sha256": "a" * 64}], "provider": "CPUExecutionProvider",
            "precision": "f32", "threads": 4, "graph_optimization": "all", "machine": {"cpu": "Xeon A"}}
    now = {"sha256": "a" * 64, "provider": "CPUExecutionProvider", "precision": "f32", "threads": 4,
           "graph_optimization": "all", "cpu": "Xeon A"}
    assert report_context(base) == now
    assert check_baseline_context(base, now) == ""
    other = {**now, "threads": 2, "cpu": "EPYC B"}
    assert context_mismatch(report_context(base), other) == ["threads 4 (now 2)", "cpu Xeon A (now EPYC B)"]
    with pytest.raises(CompressError) as exc:
        check_baseline_context(base, other, source="baseline b.json")
    msg = str(exc.value)
    assert "\n" not in msg and "threads 4 (now 2)" in msg and "cpu Xeon A (now EPYC B)" in msg
    assert "--allow-baseline-mismatch" in msg
    note = check_baseline_context(base, other, allow=True)
    assert note.startswith("note:") and "threads 4 (now 2)" in note
    assert "precision not recorded (now f32)" in check_baseline_context({}, now, allow=True)


def test_cli_refuses_a_baseline_from_another_context(hand, hand_copy, tmp):
    base = tmp / "base.json"
    res = _cli("bench", hand, "--threads", "1", "--iters", "3", "--warmup", "1", "--json", base)
    assert res.exit_code == 0, res.output
    assert report_context(json.loads(base.read_text())) == run_context(hand, threads=1)

    res = _cli("bench", hand, "--threads", "2", "--iters", "3", "--warmup", "1", "--baseline", base)
    assert isinstance(res.exception, CompressError) and "threads 1 (now 2)" in str(res.exception)
    # another file (other bytes, same graph): the sha256 differs
    other = tmp / "other.onnx"
    other.write_bytes(hand.read_bytes() + b"\n")  # trailing bytes: same graph, another file
    res = _cli("bench", other, "--threads", "1", "--iters", "3", "--warmup", "1", "--baseline", base)
    assert isinstance(res.exception, CompressError) and "model sha256" in str(res.exception)
    slow = json.loads(base.read_text())
    for r in slow["results"]:
        r["p50_ms"] *= 1000.0  # the timing gate is not what this test is about: make it pass on a busy machine
    base.write_text(json.dumps(slow))
    res = _cli("bench", hand, "--threads", "2", "--iters", "3", "--warmup", "1", "--baseline", base,
               "--allow-baseline-mismatch")
    assert res.exit_code == 0, res.output
    assert "threads 1 (now 2)" in res.output and "baseline gate PASS" in res.output
    res = _cli("bench", hand, "--threads", "1", "--iters", "3", "--warmup", "1", "--baseline", base)
    assert res.exit_code == 0 and "another context" not in res.output


# -------------------------------------------------------------- reports
def test_bench_report_schema_and_one_throughput_definition(hand):
    from export import benchmark_onnx, format_table

    rep = benchmark_onnx(hand, batch_sizes=(1, 2), threads=1, warmup=1, iters=5)
    assert rep["schema"] == "compress.bench/2"
    for r in rep["results"]:
        assert r["throughput_ips"] == pytest.approx(1000 * r["batch_size"] / r["p50_ms"])
    head = format_table(rep).splitlines()[1].split()
    assert head[head.index("p50") + 2:head.index("p50") + 4] == ["cv", "img/s"]  # cv and img/s beside p50


def test_provider_table_has_a_schema(hand):
    from export.provider_table import format_provider_table, provider_table

    rep = provider_table(hand, batch_sizes=(1,), threads=1, warmup=1, iters=3, seconds=None, providers=("cpu",),
                         parity_images=8)
    assert rep["schema"] == "compress.providers/1"
    assert " cv " in format_provider_table(rep).splitlines()[1]


def test_compare_latency_report(hand, hand_copy):
    rep = compare_latency(hand, hand_copy, rounds=5, batch_sizes=(1, 2), threads=1, warmup=1, burst_seconds=0.002,
                          max_cost_regression="0%")
    assert rep["schema"] == SCHEMA == "compress.gate/1"
    assert [b["batch_size"] for b in rep["batches"]] == [1, 2]
    assert all(len(b["round_medians_ms"]["candidate"]) == 5 for b in rep["batches"])
    assert [g["kind"] for g in rep["gates"]] == ["latency_ci", "latency_ci", "cost"]
    assert rep["gates"][2]["passed"] and rep["cost"]["candidate"]["macs"] == 11826
    assert {r["role"] for r in rep["results"]} == {"model", "compare"}
    assert rep["candidate"]["sha256"] == rep["baseline"]["sha256"]


def test_cli_baseline_model_gate(hand, hand_copy, tmp):
    out = tmp / "gate.json"
    res = _cli("bench", hand, "--baseline-model", hand_copy, "--threads", "1", "--rounds", "5", "--warmup", "1",
               "--max-cost-regression", "10%", "--budget-ms", "100000", "--json", out)
    assert res.exit_code == 0, res.output
    assert "% CI over 5 rounds; limit 1.10x: pass" in res.output and "graph cost gate PASS" in res.output
    data = json.loads(out.read_text())
    assert data["schema"] == "compress.gate/1" and data["passed"]
    assert [g["kind"] for g in data["gates"]] == ["latency_ci", "cost", "budget"]

    small = _hand_graph(tmp / "fewer_classes.onnx", classes=2)  # fewer params/bytes, same nodes
    res = _cli("bench", hand, "--baseline-model", small, "--threads", "1", "--rounds", "5", "--warmup", "1",
               "--max-cost-regression", "0%", "--max-regression", "1000%")
    assert isinstance(res.exception, CheckFailed) and "graph cost gate FAIL" in str(res.exception)
    for args in (("--rounds", "5"), ("--baseline-model", hand_copy, "--compare", hand_copy),
                 ("--baseline-model", hand_copy, "--iters", "3"), ("--baseline-model", hand_copy, "--rounds", "2"),
                 ("--baseline-model", tmp / "missing.onnx"), ("--baseline-model", hand_copy, "--provider", "all")):
        res = _cli("bench", hand, *args)
        assert isinstance(res.exception, CompressError), (args, res.output)
        assert "\n" not in str(res.exception).strip()
