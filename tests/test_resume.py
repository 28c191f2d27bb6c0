"""Interruption and resume: nothing is lost, finished stages are kept, results are identical.

A tiny ``compress distill`` (the embedded resnet20 teacher, target resnet8: the
plan is resnet20 -> resnet14 -> resnet8) runs in a real subprocess and is
killed at several points, then continued with ``--resume``. Every resumed run
must finish, must not retrain a finished stage (its ``model.safetensors`` keeps
its bytes and mtime), and must produce a student bit-identical to an
uninterrupted run with the same seed (one reference run shared by the module).

Kill points (SIGKILL: no chance to clean up), in one chain of resumes:

1. during stage 1, after its first epoch's state was saved (``stages/1-resnet14/state``);
2. between the stages, as soon as ``stages/1-resnet14/model.safetensors`` appears;
3. during the student stage, once ``stages/2-resnet8/metrics.jsonl`` has a line;
4. during the final report: ``COMPRESS_TEST_PAUSE_AT=report`` makes the pipeline
   sleep after ``student.safetensors`` and ``summary.json`` are written and before
   ``report.md`` and the ``runs/latest`` link (a test hook in ``pipeline.py``).

Ctrl-C (SIGINT) exits with code 130 and prints the resume command; resuming
gives the same student; SIGTERM likewise, with exit code 143. The first Ctrl-C is deferred to the end of the running
step and the state is saved *inside* the epoch (checked deterministically
in-process, where the signal is raised at a known step). A damaged finished
stage model or saved training state is reported on resume (exit 2, the file to
delete), and a diverging run (NaN loss) stops with exit
code 2, names the step and the learning rate, and writes no model for the stage.

Cost: the subprocesses run with one torch thread (identical settings for every
run, so results compare bit for bit) and the reference run goes on in the
background while the interrupted chain runs, which halves the wall time on the
2-core machines. ``--eval-every 2`` skips the first epoch's evaluation.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ctrl_c_at_step

REPO = Path(__file__).resolve().parents[1]
TEACHER = str(REPO / "compressor" / "assets" / "resnet20_cifar10_pretrained.safetensors")
ARGS = ["distill", "--teacher", TEACHER, "--target", "resnet8", "--epochs", "2", "--train-subset", "128",
        "--batch-size", "32", "--latency-backend", "none", "--seed", "7", "--data", "demo", "--eval-every", "2",
        "--assistants", "resnet14", "--out", "runs/run"]
STAGE1, STAGE2 = "stages/1-resnet14", "stages/2-resnet8"
POLL_S = 0.05
TIMEOUT_S = 300


class Run:
    """One ``python -m compressor.cli`` process; output goes to files (no pipe can fill up)."""

    def __init__(self, cwd: Path, *extra: str, env: dict | None = None, args: list | None = None):
        self.cwd = cwd
        n = len(list(cwd.glob("log-*.out")))
        self.out_path, self.err_path = cwd / f"log-{n}.out", cwd / f"log-{n}.err"
        full_env = {k: v for k, v in os.environ.items() if k != "COMPRESS_TEST_PAUSE_AT"}
        full_env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "compressor.cli", *(ARGS if args is None else args), *extra], cwd=cwd, env=full_env, stdout=out,
                stderr=err, stdin=subprocess.DEVNULL,
                # a shell without job control starts background jobs with SIGINT ignored; undo that
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"run did not finish in {timeout} s\n{self.out}\n{self.err}")

    def wait_for(self, condition, what: str, timeout: float = TIMEOUT_S) -> None:
        """Poll every 0.05 s until ``condition()``; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (code {self.proc.returncode}) before {what}\n{self.out}\n{self.err}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.out}\n{self.err}")
            time.sleep(POLL_S)

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.wait()

    def finish(self) -> str:
        code = self.wait()
        assert code == 0, f"exit code {code}\n{self.out}\n{self.err}"
        assert "Traceback" not in self.err, self.err
        return self.out


@pytest.fixture
def procs():
    """Kill whatever a failing test left running."""
    started: list[Run] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def start(procs, cwd: Path, *extra, env=None) -> Run:
    r = Run(cwd, *extra, env=env)
    procs.append(r)
    return r


def jsonl_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def stamp(path: Path) -> tuple:
    """What must not change for a finished stage: bytes and mtime."""
    return path.read_bytes(), path.stat().st_mtime_ns


def assert_same_student(run_dir: Path, ref_dir: Path) -> None:
    got = load_file(str(run_dir / "student.safetensors"))
    want = load_file(str(ref_dir / "student.safetensors"))
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"student differs from the uninterrupted run in {len(different)} tensors, e.g. {different[:3]}"


class Reference:
    """The uninterrupted run every interrupted one must reproduce exactly; it runs in the
    background from the first test that asks for it, :meth:`dir` waits for it."""

    def __init__(self, cwd: Path):
        self.run = Run(cwd)
        self.path = cwd / "runs" / "run"
        self.done = False

    def dir(self) -> Path:
        if not self.done:
            self.run.finish()
            self.done = True
        return self.path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.run.proc.poll() is None:
        ref.run.proc.kill()
        ref.run.proc.wait()


def test_sigkill_at_every_point_then_resume(tmp_path, reference, procs):
    run = tmp_path / "runs" / "run"

    # 1. during stage 1, after its first epoch was saved
    r = start(procs, tmp_path)
    r.wait_for(lambda: (run / STAGE1 / "state").is_dir(), "stage 1 saved its first epoch")
    assert r.kill() == -signal.SIGKILL
    assert not (run / STAGE1 / "model.safetensors").exists()

    # 2. between the stages
    r = start(procs, tmp_path, "--resume")
    r.wait_for(lambda: (run / STAGE1 / "model.safetensors").exists(), "stage 1 finished")
    r.kill()
    assert "resumed stage 1/2 resnet14 after epoch 1/2" in r.out
    stage1 = stamp(run / STAGE1 / "model.safetensors")

    # 3. during the student stage
    r = start(procs, tmp_path, "--resume")
    r.wait_for(lambda: jsonl_lines(run / STAGE2 / "metrics.jsonl") >= 1, "the student's first epoch")
    r.kill()
    assert "stage 1/2 resnet14: finished earlier" in r.out and "not retrained" in r.out
    assert stamp(run / STAGE1 / "model.safetensors") == stage1
    assert not (run / STAGE2 / "model.safetensors").exists()

    # 4. during the final report (the test hook holds the process there)
    r = start(procs, tmp_path, "--resume", env={"COMPRESS_TEST_PAUSE_AT": "report"})
    r.wait_for(lambda: (run / "summary.json").exists(), "the report phase")
    r.kill()
    assert not (run / "report.md").exists() and not (tmp_path / "runs" / "latest").exists()
    assert stamp(run / STAGE1 / "model.safetensors") == stage1
    stage2 = stamp(run / STAGE2 / "model.safetensors")

    # and finally to the end
    out = start(procs, tmp_path, "--resume").finish()
    assert out.count("not retrained") == 2
    assert stamp(run / STAGE1 / "model.safetensors") == stage1
    assert stamp(run / STAGE2 / "model.safetensors") == stage2
    for name in ("report.md", "summary.json", "config.yaml", "plan.json"):
        assert (run / name).is_file(), name
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    assert not list(run.rglob("state*")) and not list(run.rglob("*.tmp")), "leftover temporary state"
    # the per-epoch logs hold each epoch once, as in the uninterrupted run
    for stage in (STAGE1, STAGE2):
        assert [json.loads(x)["epoch"] for x in (run / stage / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert_same_student(run, reference.dir())


def _copy_until_stage1(reference: Path, dest: Path) -> None:
    """A run directory as the reference run left it between the stages."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "plan.json", "teacher_eval.json"):
        shutil.copy2(reference / name, dest / name)
    shutil.copytree(reference / STAGE1, dest / STAGE1)


def test_ctrl_c_exits_130_and_resumes_identically(tmp_path, reference, procs, capsys, monkeypatch):
    run = tmp_path / "runs" / "run"
    _copy_until_stage1(reference.dir(), run)
    # as if the run had been started by a version whose default --spacing was 2.5 (the plan names its
    # assistant, so the spacing changes nothing of this run): a flag left out on --resume continues as
    # the run started, not at today's default (which refused it before: "spacing: 2.5 -> 6.0")
    config = run / "config.yaml"
    assert "\nspacing: 6.0\n" in config.read_text()
    config.write_text(config.read_text().replace("\nspacing: 6.0\n", "\nspacing: 2.5\n"))
    r = start(procs, tmp_path, "--resume")
    r.wait_for(lambda: (run / STAGE2 / "state").is_dir(), "the student's first epoch")
    code = r.kill(signal.SIGINT)  # lands early in the second epoch, where it saves after the running step
    assert code == 130, f"exit code {code}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.err, r.err
    assert "interrupted" in r.err and "--resume" in r.err
    resume_cmd = next(line.strip() for line in r.err.splitlines() if line.strip().startswith("compress "))
    assert resume_cmd.endswith("--resume") and "--seed 7" in resume_cmd
    assert not (run / STAGE2 / "model.safetensors").exists()
    assert (run / STAGE2 / "state").is_dir()  # the finished epoch is kept

    # a flag given with another value than the run recorded is still refused, one line, nothing written
    monkeypatch.chdir(tmp_path)
    recorded = config.read_text()
    code, _, err = run_inprocess(ARGS + ["--spacing", "3", "--resume"], capsys)
    assert code == 2 and "was started with a different config (spacing: 2.5 -> 3.0)" in err, err
    assert config.read_text() == recorded

    # resumed with only the run folder: teacher, data, epochs, seed, chain, batch size... from config.yaml
    bare = ["distill", "--out", "runs/run"]  # the teacher too: recorded, compared by sha256
    r = Run(tmp_path, "--resume", args=bare)
    procs.append(r)
    out = r.finish()
    # usually mid-epoch ("in epoch 2/2 after step N"); "after epoch 1/2" if the signal came during the save
    assert re.search(r"resumed stage 2/2 resnet8 (in epoch 2/2 after step \d|after epoch 1/2)", out), out
    assert_same_student(run, reference.dir())


def test_sigterm_exits_143_with_the_resume_command_and_resumes_identically(tmp_path, reference, procs):
    """What a scheduler's preemption or time limit (``timeout``, Kubernetes, SLURM) sends: the
    running step finishes, the state is saved, exit 143 and the resume command, as for Ctrl-C."""
    run = tmp_path / "runs" / "run"
    _copy_until_stage1(reference.dir(), run)
    r = start(procs, tmp_path, "--resume")
    r.wait_for(lambda: (run / STAGE2 / "state").is_dir(), "the student's first epoch")
    code = r.kill(signal.SIGTERM)
    assert code == 143, f"exit code {code}\n{r.out}\n{r.err}"
    assert "Traceback" not in r.err, r.err
    assert "terminated (SIGTERM): finished stages and the running stage's progress are saved" in r.err, r.err
    resume_cmd = next(line.strip() for line in r.err.splitlines() if line.strip().startswith("compress "))
    assert resume_cmd.endswith("--resume")
    assert (run / STAGE2 / "state").is_dir() and not (run / STAGE2 / "model.safetensors").exists()
    start(procs, tmp_path, "--resume").finish()
    assert_same_student(run, reference.dir())


def run_inprocess(args, capsys) -> tuple[int, str, str]:
    from compressor.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_damaged_stage_model_is_reported_on_resume(tmp_path, reference, capsys, monkeypatch):
    run = tmp_path / "runs" / "run"
    _copy_until_stage1(reference.dir(), run)
    model = run / STAGE1 / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    monkeypatch.chdir(tmp_path)
    code, out, err = run_inprocess(ARGS + ["--resume"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "stage 1/2 resnet14" in lines[0] and "delete it" in lines[0], err
    assert f"rm {Path('runs/run') / STAGE1 / 'model.safetensors'}" in lines[0]
    assert not (run / STAGE2).exists()


def test_damaged_training_state_is_reported_on_resume(tmp_path, reference, capsys, monkeypatch):
    run = tmp_path / "runs" / "run"
    _copy_until_stage1(reference.dir(), run)
    state = run / STAGE2 / "state"
    state.mkdir(parents=True)
    (state / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_inprocess(ARGS + ["--resume"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "stage 2/2 resnet8: the saved training state" in lines[0], err
    assert f"rm -r {Path('runs/run') / STAGE2 / 'state'}" in lines[0]
    assert not (run / STAGE2 / "model.safetensors").exists()


def test_divergence_stops_with_the_step_and_learning_rate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_inprocess(ARGS + ["--lr", "1e30", "--warmup-epochs", "0", "--schedule", "constant", "--method", "kd"], capsys)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "training diverged" in lines[0], err
    assert re.search(r"at epoch 1, step \d+", lines[0]) and "--lr, now 1e+30" in lines[0], lines[0]
    stage = tmp_path / "runs" / "run" / "stages" / "1-resnet8"
    assert stage.is_dir() and not (stage / "model.safetensors").exists()
    assert not (tmp_path / "runs" / "run" / "student.safetensors").exists()


def _synthetic_run(out: Path, *, resume: bool = False, **changes) -> dict:
    from compressor.config import DistillConfig, resolve_config
    from compressor.data import synthetic_data
    from compressor.pipeline import run_distillation

    cfg = resolve_config(DistillConfig, None, dict(teacher=TEACHER, target="resnet8", method="kd", epochs=2,
                                                   batch_size=16, out=str(out), seed=5, lr=0.05,
                                                   latency_backend="none", **changes))
    data = synthetic_data(num_classes=10, n_train=64, n_test=16, seed=1)
    return run_distillation(cfg, data=data, show_progress=False, resume=resume)


def test_ctrl_c_mid_epoch_saves_the_step_and_resumes_identically(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C is deferred to the end of the running step, the state saved there."""
    import compressor.trainer as trainer

    _synthetic_run(tmp_path / "a")
    real_loss = trainer.dgkd_loss
    calls = ctrl_c_at_step(monkeypatch, 6)  # epoch 2 (4 steps per epoch), step 2
    with pytest.raises(KeyboardInterrupt):
        _synthetic_run(tmp_path / "b")
    assert len(calls) == 6  # the running step was finished, no further one started
    assert "saving the training state" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(trainer, "dgkd_loss", real_loss)
    stage = tmp_path / "b" / "stages" / "1-resnet8"
    assert (stage / "state").is_dir() and not (stage / "model.safetensors").exists()

    (tmp_path / "b").rename(tmp_path / "c")  # a run moved with its state resumes where it is now
    _synthetic_run(tmp_path / "c", resume=True)
    assert "resumed stage 1/1 resnet8 in epoch 2/2 after step 2" in capsys.readouterr().out
    assert_same_student(tmp_path / "c", tmp_path / "a")
    # the epoch log is the uninterrupted one, running sums included (only the timings differ)
    logs = [[{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (d / "stages" / "1-resnet8" / "metrics.jsonl").read_text().splitlines()]
            for d in (tmp_path / "a", tmp_path / "c")]
    assert logs[0] == logs[1] and len(logs[0]) == 2


def test_a_run_resumed_after_an_upgrade_keeps_its_recorded_family_defaults(tmp_path, monkeypatch, capsys):
    """The version that started the run defaulted ResNets to label smoothing 0.2; the upgraded one
    (today's: 0) resumes it with the 0.2 its config.yaml recorded, says so, and gives the student a
    run without a break at 0.2 gives."""
    import dataclasses

    import compressor.training_defaults as td

    _synthetic_run(tmp_path / "a", label_smoothing=0.2)
    monkeypatch.setitem(td.FAMILY_DEFAULTS, "cifar_resnet",
                        dataclasses.replace(td.FAMILY_DEFAULTS["cifar_resnet"], label_smoothing=0.2))
    ctrl_c_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _synthetic_run(tmp_path / "b")
    monkeypatch.undo()  # the upgrade
    capsys.readouterr()
    _synthetic_run(tmp_path / "b", resume=True)
    said = capsys.readouterr().out
    assert "resnet8: resumed with the label smoothing 0.2 the run started with (this version's default: " \
           "label smoothing 0)" in said, said
    import yaml

    record = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["training_defaults"]["resnet8"]
    assert record["label_smoothing"] == 0.2 and set(record["kept_from_run"]) == {"label_smoothing"}
    assert_same_student(tmp_path / "b", tmp_path / "a")
