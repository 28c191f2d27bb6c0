"""Latency-aware planning: onnxruntime batch-1 latency, cached per machine."""
import json

import pytest

from compressor.errors import CompressError
from compressor.latency import onnx_latency_ms
from compressor.planning import pick_student_by_latency, plan_chain


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    # the library does not import export: onnxruntime timing is injected (the CLI does this)
    from export.bench import onnx_model_latency_ms

    monkeypatch.setattr("compressor.latency._onnx_timer", onnx_model_latency_ms)
    return tmp_path / "latency.json"


def test_onnx_latency_is_measured_once_then_cached(cache, monkeypatch):
    ms = onnx_latency_ms("resnet8", warmup=2, iters=5)
    assert ms > 0
    assert len(json.loads(cache.read_text())) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("a cached latency must not export again")

    monkeypatch.setattr("compressor.latency._onnx_timer", no_export)
    assert onnx_latency_ms("resnet8", warmup=2, iters=5) == ms


def test_plan_by_latency_and_target_latency(cache, monkeypatch):
    # The planner's logic under a deterministic timer (ms = parameters / 1e4): exporting the
    # eight family members for real costs a minute and is what the test above and
    # tests/test_run_latency.py already prove.
    def by_params(model, meta, **kwargs):
        return sum(p.numel() for p in model.parameters()) / 1e4

    monkeypatch.setattr("compressor.latency._onnx_timer", by_params)
    plan = plan_chain("resnet20", 10, "resnet8", by="latency")
    assert plan.latency_backend == "onnxruntime"
    assert [m.arch for m in plan.members][0] == "resnet20" and plan.student.arch == "resnet8"
    assert [m.latency_ms for m in plan.members] == pytest.approx([m.params / 1e4 for m in plan.members])
    # every member below the teacher fits a huge budget: the largest one is picked
    arch, measured = pick_student_by_latency("cifar_resnet", 1e9, "resnet20", 10)
    assert arch == "resnet14" and [n for n, _ in measured] == ["resnet8", "resnet14"]
    with pytest.raises(CompressError, match="no cifar_resnet model smaller than the teacher runs within"):
        pick_student_by_latency("cifar_resnet", 1e-6, "resnet20", 10)


def test_plan_table_leaves_a_gap_for_a_model_that_does_not_time(cache, monkeypatch):
    from compressor.config import DistillConfig
    from compressor.latency import NoOnnxTimer
    from compressor.planning import Plan, format_plan

    assert DistillConfig().latency_backend == "onnxruntime"  # the plan table shows the deployed runtime's number

    def teacher_fails(model, meta, **kwargs):
        if meta.arch == "resnet20":
            raise RuntimeError("exporter gave up\nlong trace")
        return 0.25

    monkeypatch.setattr("compressor.latency._onnx_timer", teacher_fails)
    plan = plan_chain("resnet20", 10, "resnet8", latency_backend="onnxruntime")
    assert [m.latency_ms for m in plan.members] == [None, 0.25]
    assert plan.latency_failed == {"resnet20": "RuntimeError: exporter gave up"}
    text = format_plan(plan)
    assert "latency ms (onnxruntime, batch 1)" in text
    assert "latency: not measured for resnet20 (RuntimeError: exporter gave up)" in text
    assert Plan.from_dict(plan.to_dict()).latency_failed == plan.latency_failed
    with pytest.raises(RuntimeError, match="exporter gave up"):  # planning by latency needs every number
        plan_chain("resnet20", 10, "resnet8", by="latency")
    monkeypatch.setattr("compressor.latency._onnx_timer", None)
    with pytest.raises(NoOnnxTimer, match="set_onnx_timer"):  # a setup error is not a model's gap
        plan_chain("resnet20", 10, "resnet8", latency_backend="onnxruntime")
