"""Distributed data parallel on CPU: two processes under torchrun, Accelerate in MULTI_CPU mode.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate
1.15, so CPU data parallelism is launched with torchrun plus ACCELERATE_USE_CPU=true
(Accelerate then picks the gloo backend); on GPUs use `accelerate launch --multi_gpu`.

Documented step count: with P processes each optimisation step consumes P
batches (one per process), so an epoch has ceil(ceil(N / batch_size) / P) steps.
With N = 256 training images and batch 32: 8 batches -> 4 steps per process.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_process_distillation_completes(tmp_path, pretrained_teacher):
    compress = shutil.which("compress", path=str(Path(sys.executable).parent))
    assert compress, "the compress console script is installed next to the interpreter"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), compress,
           "distill", "--teacher", str(pretrained_teacher), "--target", "resnet8", "--method", "kd",
           "--data", "demo", "--train-subset", "256", "--batch-size", "32", "--epochs", "1",
           "--latency-backend", "none", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in
               (tmp_path / "run" / "stages" / "1-resnet8" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["steps"] == 4  # ceil(ceil(256 / 32) / 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["chain"][-1]["arch"] == "resnet8"
    assert proc.stdout.count("run directory:") == 1  # accelerator.print: main process only
    assert "world of 2 processes" in proc.stdout
