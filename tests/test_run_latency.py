"""The run table's latency: measured once per model, after training, on the main process, in the
deployed runtime (onnxruntime fp32 with ``compress bench``'s settings) -- not at plan time in every
process, and not in torch eager while another rank trains.

The in-process tests inject the onnxruntime timer (``compressor.latency.set_onnx_timer``) and record
when and how it is called; the two-process test compares the table with ``compress bench``.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from compressor import latency as latency_mod
from compressor.config import DistillConfig, resolve_config
from compressor.data import synthetic_data
from compressor.pipeline import _measure_run_latency, run_distillation
from compressor.report import format_summary
from tests.test_multiprocess import free_port

FAKE_MS = {"resnet20": 3.0, "resnet8": 1.0}


@pytest.fixture
def fake_timer():
    """An onnxruntime timer that records its calls (arch, threads, whether the student was already saved)."""
    calls = []
    state = {"student_file": None}

    def timer(model, meta, *, threads=None, warmup=10, iters=50, seconds=None):
        student = state["student_file"]
        calls.append({"arch": meta.arch, "threads": threads, "seconds": seconds, "trained": bool(student and student.exists()),
                      "rank": os.environ.get("RANK", "0"), "input_size": tuple(meta.input_size)})
        return FAKE_MS[meta.arch]

    previous = latency_mod.set_onnx_timer(timer)
    yield calls, state
    latency_mod.set_onnx_timer(previous)


def _cfg(tmp_path, teacher, **extra):
    return resolve_config(DistillConfig, None, dict(teacher=str(teacher), target="resnet8", method="kd", epochs=1,
                                                   batch_size=32, out=str(tmp_path / "run"), seed=5, lr=0.05,
                                                   **extra))


def test_run_table_latency_is_timed_once_after_training(tmp_path, pretrained_teacher, fake_timer, capsys):
    calls, state = fake_timer
    state["student_file"] = tmp_path / "run" / "stages" / "1-resnet8" / "model.safetensors"
    data = synthetic_data(num_classes=10, n_train=64, n_test=32, seed=1)
    summary = run_distillation(_cfg(tmp_path, pretrained_teacher), data=data, show_progress=False)
    out = capsys.readouterr().out
    # once per model of the chain (teacher, student), after the student was trained and saved,
    # with compress bench's thread count, at the data's size
    assert [c["arch"] for c in calls] == ["resnet20", "resnet8"]
    assert all(c["trained"] for c in calls)
    from export.machine import default_threads

    assert all(c["threads"] == default_threads() == latency_mod.bench_threads() for c in calls)
    assert all(c["input_size"] == (3, 32, 32) and c["seconds"] == 1.0 for c in calls)  # bench's default
    assert [m["latency_ms"] for m in summary["chain"]] == [3.0, 1.0]
    info = summary["latency"]
    assert summary["latency_backend"] == info["backend"] == "onnxruntime"
    assert (info["precision"], info["batch_size"], info["statistic"], info["threads"]) == \
        ("fp32", 1, "p50", default_threads())
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [m["latency_ms"] for m in saved["chain"]] == [3.0, 1.0] and saved["latency"] == info
    # the plan is not timed (the plan table says when it will be), the run table says how it was
    assert "latency: measured once after training, in onnxruntime (the final table)" in out
    note = (f"latency: onnxruntime fp32 on the CPU, batch 1, p50 of 1 s of calls, {default_threads()} threads "
            f"(as 'compress bench'), measured once, after training, on the main process")
    assert note in out and note in (tmp_path / "run" / "report.md").read_text()
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert all(m["latency_ms"] is None for m in plan["chain"])


def test_latency_backend_none_times_nothing(tmp_path, pretrained_teacher, fake_timer):
    calls, _ = fake_timer
    data = synthetic_data(num_classes=10, n_train=64, n_test=32, seed=1)
    summary = run_distillation(_cfg(tmp_path, pretrained_teacher, latency_backend="none"), data=data,
                               show_progress=False)
    assert calls == [] and all(m["latency_ms"] is None for m in summary["chain"])
    assert summary["latency"] == {"backend": "none", "note": "latency not measured: --latency-backend none"}
    assert "latency:" not in format_summary(summary)


def test_only_the_main_process_times(fake_timer):
    calls, _ = fake_timer
    waited = []
    rows = [{"arch": "resnet20", "model_kwargs": {}, "latency_ms": 99.0}, {"arch": "resnet8", "latency_ms": 98.0}]

    def run(main):
        return SimpleNamespace(main=main, accelerator=SimpleNamespace(wait_for_everyone=lambda: waited.append(main)),
                               tmeta=SimpleNamespace(num_classes=10), bundle=SimpleNamespace(input_size=(3, 32, 32)),
                               cfg=SimpleNamespace(latency_backend="torch"))

    assert _measure_run_latency(run(False), rows) == {"backend": "none"}
    assert calls == [] and waited == [False]  # another rank: waits for the main one, times nothing
    info = _measure_run_latency(run(True), rows)
    assert [c["arch"] for c in calls] == ["resnet20", "resnet8"] and waited == [False, True]
    assert info["backend"] == "onnxruntime" and [r["latency_ms"] for r in rows] == [3.0, 1.0]


def test_a_model_that_does_not_time_leaves_a_gap_not_a_failed_run():
    def timer(model, meta, **kwargs):
        if meta.arch == "resnet20":
            raise RuntimeError("exporter gave up\nlong trace")
        return 1.0

    lat, info = latency_mod.chain_latency([("resnet20", {}), ("resnet8", {})], num_classes=10, timer=timer)
    assert lat == [None, 1.0] and info["failed"] == {"resnet20": "RuntimeError: exporter gave up"}
    assert latency_mod.describe_latency(info).endswith("; not measured for resnet20 (RuntimeError: exporter gave up)")


def test_chain_latency_without_a_timer_is_not_measured():
    previous = latency_mod.set_onnx_timer(None)
    try:
        lat, info = latency_mod.chain_latency([("resnet8", {})], num_classes=10)
    finally:
        latency_mod.set_onnx_timer(previous)
    assert lat == [None] and info["backend"] == "none" and "set_onnx_timer" in info["note"]


def test_old_summaries_say_their_latency_came_from_the_plan():
    summary = {"chain": [{"role": "student", "arch": "resnet8", "final_test_top1": 50.0, "best_val_top1": 49.0,
                          "params": 78_042, "macs": 12_000_000, "latency_ms": 0.5, "train_seconds": 3}],
               "latency_backend": "torch"}
    assert "latency: torch eager, batch 1, measured when the run was planned" in format_summary(summary)


@pytest.mark.timeout(420)
def test_two_process_run_table_agrees_with_compress_bench(tmp_path, pretrained_teacher):
    """torchrun with 2 CPU processes: the student's table latency is within 2x of 'compress bench' on its
    export (both onnxruntime, batch 1, p50, same threads); before, rank 0 timed torch eager at plan time.
    2x, not tighter: the table is timed while the other test worker may load the 2 cores (CI once read
    0.42 ms against 0.26 and 0.24 ms); torch eager is 3.9x onnxruntime for this ResNet-8 at one thread
    (0.94 vs 0.24 ms, 2026-11-30), so 2x still tells the two apart."""
    compress = shutil.which("compress", path=str(Path(sys.executable).parent))
    assert compress, "the compress console script is installed next to the interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           compress, "distill", "--teacher", str(pretrained_teacher), "--target", "resnet8", "--method", "kd",
           "--data", "demo", "--train-subset", "128", "--batch-size", "32", "--epochs", "1",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["latency"]["backend"] == "onnxruntime" and proc.stdout.count("latency: onnxruntime") == 1
    table_ms = summary["chain"][-1]["latency_ms"]
    # 'compress bench' twice: on a shared runner the load changes between measurements, so the table must
    # agree with at least one of two bench runs (each: onnxruntime, batch 1, p50 of 1 s of calls)
    steps = [[compress, "export", str(tmp_path / "run"), "--out", str(tmp_path / "s.onnx"), "--no-validate"]]
    steps += [[compress, "bench", str(tmp_path / "s.onnx"), "--json", str(tmp_path / f"b{i}.json")] for i in (1, 2)]
    for step in steps:
        done = subprocess.run(step, cwd=tmp_path, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    benches = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in (1, 2)]
    assert all(b["threads"] == summary["latency"]["threads"] for b in benches)
    bench_ms = [b["results"][0]["p50_ms"] for b in benches]
    assert any(1 / 2 <= table_ms / ms <= 2 for ms in bench_ms), (table_ms, bench_ms)


def test_a_grayscale_chain_is_timed_by_the_real_onnxruntime_timer():
    """1-channel 28-px models export with 1-value mean/std metadata and get a latency; before, the
    3-value CIFAR default made every export's metadata unreadable and the column stayed empty."""
    from export.bench import onnx_model_latency_ms

    lat, info = latency_mod.chain_latency([("cnn2", {"input_hw": 28})], num_classes=10, input_size=(1, 28, 28),
                                          timer=onnx_model_latency_ms, warmup=1, seconds=0.05)
    assert "failed" not in info, info
    assert lat[0] is not None and lat[0] > 0


def test_a_run_whose_latency_failed_says_why_under_its_table():
    summary = {"chain": [{"role": "student", "arch": "resnet8", "final_test_top1": 50.0, "best_val_top1": 49.0,
                          "params": 78_042, "macs": 12_000_000, "latency_ms": None, "train_seconds": 3}],
               "latency": {"backend": "onnxruntime", "precision": "fp32", "batch_size": 1, "statistic": "p50",
                           "seconds": 1.0, "threads": 2, "when": "once", "failed": {"resnet8": "RuntimeError: no"}}}
    assert format_summary(summary).endswith("; not measured for resnet8 (RuntimeError: no)")
