"""Bad input never produces a traceback: the real CLI answers exit code 2 and one line.

Every row of ``CASES`` runs ``compress ...`` and checks: exit code 2, exactly one
non-empty line on stderr that starts with ``error:`` and names the problem (a
distinctive substring), no ``Traceback`` anywhere, and nothing created or changed
in the working folder (a snapshot of paths, sizes, mtimes and hashes before and
after). Rows run in-process through :func:`compressor.cli.main` (a subprocess
costs 6-10 s of imports on the 2-core machines); a few rows also run in a real
subprocess (``python -m compressor.cli``) to prove no traceback reaches a terminal.

Kinds of bad input covered:

* model files: a missing file; a directory instead of a file; an empty (0-byte)
  file; a truncated safetensors file; a safetensors file without compress
  metadata (and loading it with ``--arch`` works); a checkpoint whose tensors do
  not match its arch; an unknown model name (with close-name suggestions, for
  ``--target`` and ``--arch``); a teacher whose number of classes differs from the
  data's (``distill`` and ``eval``);
* planning: a target larger than the teacher; ``--assistants 2`` where there is
  no room (resnet14 -> resnet8);
* data: an empty data directory; a directory of unknown layout; an image file
  that is not an image (a ``.png`` holding text);
* recipes and flags: a recipe with an unknown key and with a value of the wrong
  type (both name the key); zero/negative epochs, batch size, temperature,
  learning rate; λ (``--kd-weight``) outside [0, 1];
* outputs: an output path in a directory that does not exist (``import``,
  ``train``, ``export``, ``eval --json``); an output directory that is not
  writable (skipped when running as root, where permissions do not bind);
* ONNX: a file that is not ONNX (``eval``, ``bench``); an ONNX model whose
  input does not fit the data (1 input channel) or whose classes do not (100);
* runs: ``--resume`` on a run directory made with a different config (refused,
  showing ``seed: 3 -> 4``); ``--resume`` with nothing to resume; a second run
  into an existing run directory without ``--resume``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_inprocess, snapshot
import torch
from PIL import Image
from safetensors.torch import save_file

from compressor.checkpoint import meta_for, save_checkpoint
from compressor.config import DistillConfig, config_to_dict, resolve_config
from compressor.fileio import write_yaml
from compressor.models import create_model

REPO = Path(__file__).resolve().parents[1]
TEACHER = str(REPO / "compressor" / "assets" / "resnet20_cifar10_pretrained.safetensors")
TINY = ["--data", "demo", "--epochs", "1", "--train-subset", "32", "--batch-size", "32",
        "--latency-backend", "none"]


# ----------------------------------------------------------------- fixtures
def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _onnx(path: Path, arch: str, *, num_classes: int = 10, in_chans: int = 3) -> None:
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans).eval()
    meta = meta_for(arch, num_classes=num_classes, in_chans=in_chans,
                    mean=[0.5] * in_chans, std=[0.25] * in_chans)
    export_onnx((model, meta), path, legacy=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder with every bad (and one good) input; rows must leave it unchanged."""
    d = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    (d / "empty.safetensors").write_bytes(b"")
    data = Path(TEACHER).read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "folder.safetensors").mkdir()
    resnet8 = create_model("resnet8")
    save_file({k: v.contiguous() for k, v in resnet8.state_dict().items()}, str(d / "plain.safetensors"))
    save_checkpoint(d / "mislabelled.safetensors", resnet8, meta_for("resnet14", num_classes=10))
    save_checkpoint(d / "resnet14.safetensors", create_model("resnet14"), meta_for("resnet14", num_classes=10))
    (d / "junk.onnx").write_text("this is not an ONNX model\n")
    _onnx(d / "gray.onnx", "resnet8", in_chans=1)
    _onnx(d / "c100.onnx", "resnet8", num_classes=100)
    # data folders
    for split in ("train", "val"):
        for i, c in enumerate(("cat", "dog", "owl")):
            (d / "three" / split / c).mkdir(parents=True)
            for j in range(2):
                _png(d / "three" / split / c / f"{j}.png", 10 * i + j)
        (d / "oneclass" / split / "cat").mkdir(parents=True)
        for j in range(2):
            _png(d / "oneclass" / split / "cat" / f"{j}.png", 50 + j)
        (d / "notimage" / split / "cat").mkdir(parents=True)
        (d / "notimage" / split / "cat" / "0.png").write_text("plain text pretending to be a PNG\n")
    (d / "emptydata").mkdir()
    (d / "oddlayout").mkdir()
    (d / "oddlayout" / "notes.txt").write_text("no images here\n")
    # recipes
    (d / "unknown_key.yaml").write_text("epochs: 1\nlearnign_rate: 0.1\n")
    (d / "wrong_type.yaml").write_text("epochs: 1\nbatch_size: lots\n")
    # a run directory started with --seed 3 (what `compress distill ... --seed 3` writes first)
    cli_values = dict(teacher=TEACHER, target="resnet8", data="demo", epochs=1, train_subset=32,
                      batch_size=32, latency_backend="none", seed=3, out="run3")
    cfg = resolve_config(DistillConfig, None, cli_values)
    write_yaml(d / "run3" / "config.yaml", {**config_to_dict(cfg), "target": "resnet8"})
    (d / "nothing_to_resume").mkdir()
    (d / "busy_run").mkdir()
    (d / "busy_run" / "plan.json").write_text("{}\n")
    (d / "readonly").mkdir()
    os.chmod(d / "readonly", 0o500)
    yield d
    os.chmod(d / "readonly", 0o700)


run_inprocess = run_cli_inprocess


def run_subprocess(args, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_bad_input(code, out, err, expect: str) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, f"exit code {code}\nstdout: {out}\nstderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"


# ----------------------------------------------------------------- the table
# (id, argv, distinctive substring of the one error line). Paths are relative to `work`.
CASES = [
    # model files
    ("missing-file", ["eval", "nope.safetensors"], "'nope.safetensors' does not exist"),
    ("directory-not-file", ["eval", "folder.safetensors"], "is a directory, expected a file"),
    ("empty-file", ["eval", "empty.safetensors"], "is empty (0 bytes)"),
    ("truncated-safetensors", ["eval", "truncated.safetensors"], "truncated or damaged"),
    ("no-metadata", ["eval", "plain.safetensors"], "no compress metadata (arch, num_classes); convert it with 'compress import FILE --arch NAME"),
    ("tensors-do-not-match-arch", ["eval", "mislabelled.safetensors"], "weights do not match arch 'resnet14'"),
    ("missing-teacher", ["distill", "--teacher", "nope.safetensors", "--target", "resnet8", *TINY],
     "'nope.safetensors' does not exist"),
    ("classes-disagree-distill", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--out", "r",
                                  *TINY[2:], "--data", "three"],
     "teacher has 10 classes but the data has 3"),
    ("classes-disagree-eval", ["eval", TEACHER, "--data", "three"], "model has 10 classes but the data has 3"),
    ("unknown-target", ["distill", "--teacher", TEACHER, "--target", "resnet9", "--out", "r", *TINY],
     "Did you mean: resnet8"),
    ("unknown-arch", ["train", "--arch", "resnet9", "--data", "demo", "--out", "x.safetensors"],
     "Did you mean: resnet8"),
    # planning
    ("target-larger-than-teacher", ["plan", "--teacher", TEACHER, "--target", "resnet56",
                                    "--latency-backend", "none"], "is not smaller than the teacher resnet20"),
    ("no-room-for-assistants", ["plan", "--teacher", "resnet14.safetensors", "--target", "resnet8",
                                "--assistants", "2", "--latency-backend", "none"],
     "no room for 2 assistants between resnet14 and resnet8"),
    # data
    ("empty-data-dir", ["eval", TEACHER, "--data", "emptydata"], "data directory 'emptydata' is empty"),
    ("unknown-data-layout", ["eval", TEACHER, "--data", "oddlayout"], "unknown data layout in 'oddlayout'"),
    ("missing-data-dir", ["eval", TEACHER, "--data", "nodata"], "data path 'nodata' does not exist"),
    ("image-not-an-image", ["eval", TEACHER, "--data", "notimage"], "cannot decode image file"),
    ("train-one-class", ["train", "--arch", "resnet8", "--data", "oneclass", "--out", "x.safetensors"],
     "the data has 1 class (one class folder); a classifier needs at least 2"),
    ("onnx-as-teacher", ["distill", "--teacher", "gray.onnx", "--target", "resnet8", *TINY],
     "this is an ONNX file: give the .safetensors checkpoint it was exported from"),
    # recipes and flags
    ("recipe-unknown-key", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--recipe",
                            "unknown_key.yaml"], "unknown key 'learnign_rate'"),
    ("recipe-wrong-type", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--recipe",
                           "wrong_type.yaml"], "key 'batch_size' must be int"),
    ("missing-recipe", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--recipe", "no.yaml"],
     "recipe 'no.yaml' does not exist"),
    ("zero-epochs", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--epochs", "0"],
     "epochs must be > 0, got 0"),
    ("negative-batch-size", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--batch-size", "-4"],
     "batch_size must be > 0, got -4"),
    ("zero-temperature", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--temperature", "0"],
     "temperature must be > 0"),
    ("negative-temperature", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--temperature", "-5"],
     "temperature must be > 0"),
    ("negative-lr", ["train", "--arch", "resnet8", "--out", "x.safetensors", "--lr", "-0.1"],
     "lr must be > 0"),
    ("train-zero-epochs", ["train", "--arch", "resnet8", "--out", "x.safetensors", "--epochs", "0"],
     "epochs must be > 0"),
    ("kd-weight-above-1", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--kd-weight", "1.5"],
     "kd_weight (λ) must be in [0, 1], got 1.5"),
    ("kd-weight-below-0", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--kd-weight", "-0.1"],
     "kd_weight (λ) must be in [0, 1], got -0.1"),
    ("eval-zero-batch-size", ["eval", TEACHER, "--batch-size", "0"], "--batch-size must be > 0"),
    # outputs
    ("import-out-missing-dir", ["import", TEACHER, "--arch", "resnet20", "--out", "/nonexistent/dir/x.safetensors"],
     "output folder '/nonexistent/dir' does not exist"),
    ("train-out-missing-dir", ["train", "--arch", "resnet8", "--data", "demo", "--out", "missing/x.safetensors"],
     "output folder 'missing' does not exist"),
    ("export-out-missing-dir", ["export", "--onnx", TEACHER, "--out", "missing/x.onnx"],
     "output folder 'missing' does not exist"),
    ("eval-json-missing-dir", ["eval", TEACHER, "--json", "missing/m.json"], "output folder 'missing' does not exist"),
    ("train-out-not-writable", ["train", "--arch", "resnet8", "--out", "readonly/x.safetensors"],
     "output folder 'readonly' is not writable"),
    ("distill-out-not-writable", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--out",
                                  "readonly/run", *TINY], "readonly is not writable"),
    # ONNX
    ("eval-not-onnx", ["eval", "junk.onnx"], "junk.onnx: not a loadable ONNX model"),
    ("bench-not-onnx", ["bench", "junk.onnx", "--iters", "1"], "junk.onnx: not a loadable ONNX model"),
    ("onnx-input-does-not-fit", ["eval", "gray.onnx", "--data", "demo"], "does not fit the data's images"),
    ("onnx-classes-do-not-fit", ["eval", "c100.onnx", "--data", "demo"], "model has 100 classes but the data has 10"),
    # runs
    ("resume-different-config", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--out", "run3",
                                 "--resume", *TINY, "--seed", "4"], "seed: 3 -> 4"),
    ("resume-nothing", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--out", "nothing_to_resume",
                        "--resume", *TINY], "nothing to resume in nothing_to_resume"),
    ("existing-run-dir", ["distill", "--teacher", TEACHER, "--target", "resnet8", "--out", "busy_run", *TINY],
     "run directory busy_run already exists; continue it with --resume"),
]
NOT_WRITABLE = {"train-out-not-writable", "distill-out-not-writable"}


@pytest.mark.parametrize("args,expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_and_exit_2(work, args, expect, capsys, monkeypatch, request):
    if request.node.callspec.id in NOT_WRITABLE and os.access(work / "readonly", os.W_OK):
        pytest.skip("running as root: a 0o500 directory is still writable")
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, out, err = run_inprocess(args, capsys)
    assert_bad_input(code, out, err, expect)
    assert snapshot(work) == before, "a failing command created or changed files"
    assert not Path("/nonexistent").exists()


def test_table_has_every_kind():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


# A real process: what a user's terminal sees (exit status, stderr), no traceback.
SUBPROCESS_CASES = ["truncated-safetensors", "unknown-arch", "eval-not-onnx"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(work, case_id):
    _, args, expect = next(c for c in CASES if c[0] == case_id)
    before = snapshot(work)
    code, out, err = run_subprocess(args, work)
    assert_bad_input(code, out, err, expect)
    assert snapshot(work) == before


def test_foreign_safetensors_load_with_arch(work, capsys, monkeypatch):
    """The way out that the no-metadata message names works."""
    monkeypatch.chdir(work)
    code, out, err = run_inprocess(["eval", "plain.safetensors", "--arch", "resnet8", "--data", "demo"], capsys)
    assert code == 0, err
    assert "top-1" in out and "1000 images" in out


def test_model_sized_for_another_input_is_refused_before_training(in_tmp, capsys):
    """cnn4's head flattens a 32-px map: on 28-px data it is one line, exit 2, nothing written;
    its size option makes it train there."""
    from conftest import run_cli_inprocess
    from data_folders import write_uniform_folder

    write_uniform_folder(in_tmp / "gray28", 28, mode="L", per_class=8, classes=2)
    code, _, err = run_cli_inprocess(["train", "--arch", "cnn4", "--data", "gray28", "--epochs", "1",
                                      "--out", "t.safetensors"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cnn4 fails on a (2, 1, 28, 28) input")
    assert "--option input_hw=28" in err and not (in_tmp / "t.safetensors").exists()
    code, out, err = run_cli_inprocess(["train", "--arch", "cnn4", "--option", "input_hw=28", "--data", "gray28",
                                        "--epochs", "1", "--batch-size", "8", "--out", "t.safetensors"], capsys)
    assert code == 0, err
    assert (in_tmp / "t.safetensors").exists()
