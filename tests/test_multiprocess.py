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
import re
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


@pytest.mark.timeout(300)
def test_nan_on_one_rank_stops_every_rank_and_resume_needs_the_same_world(tmp_path, pretrained_teacher, capsys):
    """A NaN loss on rank 1 only: both processes stop at the same step with the one-line
    message (no rank left waiting in an all-reduce), nothing is written for the stage,
    and resuming the run with one process is refused naming the difference."""
    import time

    compress = shutil.which("compress", path=str(Path(sys.executable).parent))
    args = ["distill", "--teacher", str(pretrained_teacher), "--target", "resnet8", "--method", "kd",
            "--data", "demo", "--train-subset", "256", "--batch-size", "32", "--epochs", "1",
            "--latency-backend", "none", "--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), compress, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "COMPRESS_TEST_NAN_AT": "1:1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # Rank 0, whose loss was fine, stops with rank 1's one-line message and exit 2 instead of
    # waiting in an all-reduce. (Rank 1 exits 2 as well, unless torchrun, seeing rank 0 gone,
    # SIGTERMs it first: torchrun then lists it with -15.)
    message = "error: training diverged: loss is nan at epoch 1, step 2 in process 1 of 2"
    assert message in proc.stderr, out[-3000:]
    exit_codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*\n\s*exitcode\s*: (-?\d+)", out))
    assert exit_codes.get("0") == "2" and exit_codes.get("1") in ("2", "-15"), out[-3000:]
    workers = proc.stderr.split("torch/distributed/elastic")[0]  # what the workers printed; torchrun's own
    assert "Traceback" not in workers and "compressor/" not in workers, proc.stderr[-3000:]  # report follows
    assert took < 240
    stage = tmp_path / "run" / "stages" / "1-resnet8"
    assert not (stage / "model.safetensors").exists() and not (stage / "state").exists()
    assert not (tmp_path / "run" / "student.safetensors").exists()

    from compressor.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args + ["--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "num_processes: 2 -> 1" in err, err


def test_augmentation_draws_differ_per_rank_and_repeat():
    from compressor.trainer import augmentation_generator

    class World:
        def __init__(self, n, rank):
            self.num_processes, self.process_index = n, rank

    def draws(acc):
        return torch.randint(0, 9, (64,), generator=augmentation_generator(7, 2, 5, acc)).tolist()

    import torch

    assert draws(World(2, 0)) != draws(World(2, 1))      # ranks crop differently
    assert draws(World(2, 1)) == draws(World(2, 1))      # ... and reproducibly
    single = torch.randint(0, 9, (64,), generator=__import__("compressor.trainer", fromlist=["x"])
                           .seeded_generator(7, 2, 5)).tolist()
    assert draws(World(1, 0)) == single                  # one process: the seeds of earlier versions
