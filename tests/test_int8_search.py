"""Accuracy-aware INT8 (``compress export --quantize int8 --max-accuracy-drop``).

The test data are labelled with the fp32 model's own predictions, so fp32 scores
100% and every prediction the INT8 file changes is a lost point: an untrained
model's logits are close together, so some do change with every candidate.
Speed (INT8 is kept only when faster than fp32) is decided on injected timings
(``speed_timer``), so no test depends on how busy the machine is.
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
from export.quantize import (SENSITIVE_LAYERS, int8_candidates, interleaved_b1_p50, quantize_accuracy_aware,
                             sensitive_node_names)


def faster(path, ref):  # injected timings: INT8 0.5 ms, fp32 1.0 ms (2x faster)
    return 0.5, 1.0


def slower(path, ref):  # INT8 2.0 ms, fp32 1.0 ms (0.5x: slower, as MobileNetV3 INT8 on a CPU)
    return 2.0, 1.0


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
                                  echo=lines.append, speed_timer=faster)
    assert res["fp32"]["top1"] == 100.0 and res["passed"] and res["best"] == 0
    assert res["kept"] and res["reason"] == "" and res["candidates"][0]["speedup"] == 2.0
    assert len(res["candidates"]) == 1 and res["candidates"][0]["candidate"] == "minmax"
    q = OnnxModel(tmp / "pass.int8.onnx", threads=1)
    assert q.metadata["calibration_method"] == "minmax" and q.metadata["float_nodes"] == ""
    assert "within budget, kept" in lines[-1] and "fp32" in lines[2]


def test_no_candidate_within_budget_keeps_the_best(setup):
    tmp, _, fp32, data = setup
    lines = []
    res = quantize_accuracy_aware(fp32, tmp / "fail.int8.onnx", data, 0.0, calibration_size=32, threads=1,
                                  echo=lines.append, speed_timer=faster)
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


def test_within_budget_but_slower_than_fp32_is_not_kept(setup):
    tmp, _, fp32, data = setup
    out = tmp / "slow.int8.onnx"
    lines, calls = [], []

    def timer(path, ref):
        calls.append((path, ref))
        return slower(path, ref)

    res = quantize_accuracy_aware(fp32, out, data, 100.0, calibration_size=32, threads=1, echo=lines.append,
                                  speed_timer=timer)
    assert res["passed"] and not res["kept"] and not out.exists()  # accuracy fine, speed not: no INT8 file
    row = res["candidates"][0]
    assert len(res["candidates"]) == 1 and len(calls) == 1  # the sessions the search evaluated, reused
    assert calls[0][1].path == OnnxModel(fp32, threads=1).path and calls[0][0].metadata["calibration_method"] == "minmax"
    assert (row["p50_ms"], row["fp32_p50_ms"], row["speedup"], row["faster"]) == (2.0, 1.0, 0.5, False)
    assert res["fp32"]["p50_ms"] == 1.0 and res["runtime"]["threads"] == 1
    assert "not faster than fp32: not kept" in lines[-2]
    assert lines[-1] == res["reason"]
    assert res["reason"].startswith("INT8 not kept: minmax is within 100 top-1 points but not faster than fp32 "
                                    "(batch-1 p50 2.000 vs 1.000 ms, 0.50x")
    assert "deploy m.onnx" in res["reason"] and "\n" not in res["reason"]


def test_equal_speed_is_not_faster(setup):
    tmp, _, fp32, data = setup
    res = quantize_accuracy_aware(fp32, tmp / "tie.int8.onnx", data, 100.0, calibration_size=32, threads=1,
                                  echo=lambda line: None, speed_timer=lambda path, ref: (1.0, 1.0))
    assert not res["kept"] and not (tmp / "tie.int8.onnx").exists()


def test_interleaved_timer_times_both_files(setup):
    tmp, _, fp32, data = setup
    from export.quantize import calibration_images, quantize_static_int8

    q = quantize_static_int8(fp32, tmp / "timed.int8.onnx", calibration_images(data, 16))
    p50, ref = interleaved_b1_p50(q, fp32, threads=1, seconds=0.02, warmup=1)
    assert p50 > 0 and ref > 0
    p50, ref = interleaved_b1_p50(OnnxModel(q, threads=1), OnnxModel(fp32, threads=1), seconds=0.02, warmup=1)
    assert p50 > 0 and ref > 0  # sessions the search built are timed as they are


def test_cli_slower_int8_is_not_kept_exit_0(setup, monkeypatch):
    import export.quantize
    import export.runtime

    tmp, ckpt, _, data = setup
    monkeypatch.setattr(export.runtime, "load_bundle", lambda spec, *args, **kwargs: data)
    monkeypatch.setattr(export.quantize, "interleaved_b1_p50", lambda path, ref, **kwargs: slower(path, ref))
    res = run_export_cli("export", ckpt, "--out", tmp / "clislow.onnx", "--data", "relabelled", "--no-validate",
                         "--quantize", "int8", "--calibration-size", "32", "--max-accuracy-drop", "100",
                         "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "INT8 not kept: minmax" in res.output and "deploy clislow.onnx" in res.output
    assert (tmp / "clislow.onnx").exists() and not (tmp / "clislow.int8.onnx").exists()
    assert "quantised" not in res.output


def test_kept_int8_metadata_points_at_the_kept_files(setup, tmp_path):
    """The search quantises in a scratch folder: the kept file's metadata must name the checkpoint and
    the fp32 file relative to where the kept file is, so 'bench --torch' finds the checkpoint."""
    import os

    _, ckpt, fp32, data = setup
    out = tmp_path / "elsewhere" / "m.int8.onnx"  # another folder than the fp32 file and the checkpoint
    out.parent.mkdir()
    res = quantize_accuracy_aware(fp32, out, data, 100.0, calibration_size=32, threads=1,
                                  echo=lambda line: None, speed_timer=faster)
    assert res["kept"] and out.exists()
    meta = OnnxModel(out, threads=1).metadata
    assert (out.parent / meta["source_checkpoint"]).resolve() == ckpt.resolve()
    assert (out.parent / meta["fp32_source"]).resolve() == fp32.resolve()
    assert not os.path.isabs(meta["source_checkpoint"]) and "compress-int8" not in meta["source_checkpoint"]
    bench = run_export_cli("bench", out, "--torch", "--iters", "2", "--warmup", "0", "--threads", "1")
    assert bench.exit_code == 0, bench.output
    assert "torch eager" in bench.output


def test_int8_report_builds_each_session_and_hash_once(setup, monkeypatch):
    """int8_report hands its sessions to benchmark_onnx (before: 4 sessions for 2 files), and a file is
    hashed once per process while it is unchanged."""
    import compressor.checkpoint
    import export.bench
    import export.runtime
    from export.quantize import calibration_images, int8_report, quantize_static_int8

    tmp, _, fp32, data = setup
    q = quantize_static_int8(fp32, tmp / "once.int8.onnx", calibration_images(data, 16))
    built, hashed = [], []
    init = export.runtime.OnnxModel.__init__

    def counting_init(self, path, *args, **kwargs):
        built.append(str(path))
        init(self, path, *args, **kwargs)

    real_sha = compressor.checkpoint.file_sha256
    monkeypatch.setattr(export.runtime.OnnxModel, "__init__", counting_init)
    monkeypatch.setattr(compressor.checkpoint, "file_sha256", lambda p: hashed.append(str(p)) or real_sha(p))
    monkeypatch.setattr(export.bench, "_SHA_MEMO", {})
    rep = int8_report(fp32, q, data, threads=1, iters=3, seconds=None, warmup=0, eval_images=32)
    assert sorted(built) == sorted([str(fp32), str(q)]) and rep["threads"] == 1
    assert export.bench.file_sha(q) == export.bench.file_sha(q)
    assert sorted(hashed) == sorted(str(p) for p in (fp32, q))  # the report's two entries; then memoised
    q.write_bytes(q.read_bytes() + b"\0")  # another file now: hashed again
    export.bench.file_sha(q)
    assert len(hashed) == 3


@pytest.mark.parametrize("flags, machine, saturates", [
    ({"avx2", "fma"}, "x86_64", True),                      # AVX2 only: VPMADDUBSW's 16-bit sums
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),      # AVX-512 without VNNI: the same
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),  # AVX512-VNNI: 32-bit accumulation
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"avx2", "amx_int8"}, "x86_64", False),
    ({"asimd", "asimddp"}, "aarch64", False),               # ARM: no saturation
])
def test_saturating_cpu_by_flags(flags, machine, saturates):
    from export.quantize import saturating_cpu

    assert saturating_cpu(flags, machine) is saturates


def _int8_weights(path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
            and len(t.dims) > 1]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_reduce_range_uses_seven_bit_weights_and_says_so(setup, reduce_range):
    from export.quantize import QUANTIZATION_TAG, calibration_images, quantize_static_int8

    tmp, _, fp32, data = setup
    out = quantize_static_int8(fp32, tmp / f"rr-{reduce_range}.onnx", calibration_images(data, 32),
                               reduce_range=reduce_range)
    weights = _int8_weights(out)
    assert weights  # the conv and linear weights are int8 initializers
    peak = max(int(abs(w.astype(int)).max()) for w in weights)
    # symmetric per-channel: each channel's largest weight maps to the top of the range
    assert peak == (64 if reduce_range else 127)
    meta = OnnxModel(out, threads=1).metadata
    assert meta["reduce_range"] == str(reduce_range).lower()
    assert meta["quantization"] == QUANTIZATION_TAG + ("-reduce-range" if reduce_range else "")
