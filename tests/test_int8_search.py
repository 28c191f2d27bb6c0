"""Accuracy-aware INT8 (``compress export --quantize int8 --max-accuracy-drop``).

The test data are labelled with the fp32 model's own predictions, so fp32 scores
100% and every prediction the INT8 file changes is a lost point: an untrained
model's logits are close together, so some do change with every candidate.
"""
from __future__ import annotations

import pytest
import torch

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.data import DataBundle, ImageSplit, synthetic_data
from compressor.errors import CheckFailed, CompressError
from compressor.models import create_model
from conftest import run_export_cli
from export import OnnxModel, export_onnx
from export.quantize import SENSITIVE_LAYERS, int8_candidates, quantize_accuracy_aware, sensitive_node_names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8search")
    torch.manual_seed(0)
    meta = meta_for("cnn2", num_classes=10)
    model = create_model("cnn2", num_classes=10).eval()
    ckpt = save_checkpoint(tmp / "m.safetensors", model, meta)
    fp32 = export_onnx(ckpt, tmp / "m.onnx")
    data = synthetic_data(n_train=64, n_test=256, seed=2)
    sess = OnnxModel(fp32, threads=1)
    own = torch.from_numpy(sess.predict_images(data.test.images.numpy()).argmax(1))
    relabelled = DataBundle(data.name, data.train, ImageSplit(data.test.images, own), data.class_names, data.source)
    return tmp, ckpt, fp32, relabelled


def test_candidates_order_and_sensitive_nodes(setup):
    import onnx

    assert [(c["method"], c["float_layers"]) for c in int8_candidates()] == [
        ("minmax", ()), ("entropy", ()), ("percentile", ()),
        ("minmax", SENSITIVE_LAYERS), ("entropy", SENSITIVE_LAYERS), ("percentile", SENSITIVE_LAYERS)]
    graph = onnx.load(str(setup[2]))
    names = sensitive_node_names(graph)
    ops = {n.name: n.op_type for n in graph.graph.node}
    assert len(names) == 2 and ops[names[0]] == "Conv" and ops[names[1]] in ("Gemm", "MatMul")
    first_conv = next(n.name for n in graph.graph.node if n.op_type == "Conv")
    assert names[0] == first_conv


def test_search_stops_at_the_first_candidate_within_budget(setup):
    tmp, _, fp32, data = setup
    lines = []
    res = quantize_accuracy_aware(fp32, tmp / "pass.int8.onnx", data, 100.0, calibration_size=32, threads=1,
                                  latency_seconds=0.05, echo=lines.append)
    assert res["fp32"]["top1"] == 100.0 and res["passed"] and res["best"] == 0
    assert len(res["candidates"]) == 1 and res["candidates"][0]["candidate"] == "minmax"
    q = OnnxModel(tmp / "pass.int8.onnx", threads=1)
    assert q.metadata["calibration_method"] == "minmax" and q.metadata["float_nodes"] == ""
    assert "within budget, kept" in lines[-1] and "fp32" in lines[2]


def test_no_candidate_within_budget_keeps_the_best(setup):
    tmp, _, fp32, data = setup
    lines = []
    res = quantize_accuracy_aware(fp32, tmp / "fail.int8.onnx", data, 0.0, calibration_size=32, threads=1,
                                  latency_seconds=0.05, echo=lines.append)
    rows = res["candidates"]
    assert not res["passed"] and len(rows) == 6 and all(r["drop"] > 0 for r in rows)
    best = rows[res["best"]]
    assert best["top1"] == max(r["top1"] for r in rows)
    q = OnnxModel(tmp / "fail.int8.onnx", threads=1)  # the best one is on disk
    assert q.metadata["calibration_method"] == best["method"]
    assert q.metadata["float_nodes"] == best["float_nodes"]
    assert bool(best["float_layers"]) == (q.metadata["float_nodes"] != "")
    assert sum("kept" in line for line in lines) >= 1 and len(lines) == 3 + 6
    # candidates with float layers really leave those nodes unquantised
    assert all(len(r["float_nodes"].split(",")) == 2 for r in rows if r["float_layers"])


def test_cli_exit_1_names_the_written_best(setup, monkeypatch):
    import export.runtime

    tmp, ckpt, _, data = setup
    monkeypatch.setattr(export.runtime, "load_bundle", lambda spec, *args, **kwargs: data)
    res = run_export_cli("export", ckpt, "--out", tmp / "cli.onnx", "--data", "relabelled", "--no-validate",
                         "--quantize", "int8", "--calibration-size", "32", "--max-accuracy-drop", "0",
                         "--threads", "1")
    assert isinstance(res.exception, CheckFailed), res.output
    assert "after 6 tries" in str(res.exception) and str(tmp / "cli.int8.onnx") in str(res.exception)
    assert (tmp / "cli.int8.onnx").exists()
    assert res.output.count("over budget") == 6


@pytest.mark.parametrize("args,message", [
    (("--max-accuracy-drop", "0.5"), "add --quantize int8"),
    (("--quantize", "int8", "--data", "demo", "--max-accuracy-drop", "-1"), "must be >= 0"),
    (("--quantize", "int8", "--data", "demo", "--max-accuracy-drop", "1", "--eval-images", "0"), "--eval-images"),
])
def test_cli_bad_search_options(setup, args, message):
    tmp, ckpt, _, _ = setup
    res = run_export_cli("export", ckpt, "--out", tmp / "bad.onnx", *args)
    assert isinstance(res.exception, CompressError) and message in str(res.exception)
    assert not (tmp / "bad.onnx").exists()
