import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "compressor" / "assets"
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("COMPRESS_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "compress-test-cache"))
# One pass over the training images per epoch: the suite's data sets are a few dozen images, and the
# default (repeat a small set up to 2,048 images an epoch, training_defaults.auto_epoch_repeats) would
# multiply every test run's steps by up to 50. Tests of that default unset it.
os.environ.setdefault("COMPRESS_EPOCH_MIN_IMAGES", "0")


@pytest.fixture(scope="session")
def pretrained_teacher() -> Path:
    """The embedded pretrained CIFAR-10 resnet20 (BSD-2, see compressor/assets)."""
    return ASSETS / "resnet20_cifar10_pretrained.safetensors"


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spinning against other jobs
    (recipe steps went from 234 s to 40 s under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_cli_inprocess(args, capsys) -> tuple[int, str, str]:
    """``compress ARGS`` in this process: (exit code, stdout, stderr)."""
    from compressor.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_export_cli(*args):
    """Invoke the export/bench commands in-process (exceptions stay on the result)."""
    import click
    from click.testing import CliRunner

    from export.commands import bench_cmd, export_cmd

    group = click.Group()
    group.add_command(export_cmd)
    group.add_command(bench_cmd)
    return CliRunner().invoke(group, [str(a) for a in args])


def assert_refused(code, err, marker, *words):
    """A hostile input was refused: exit 2, one line on stderr naming ``words``, and the
    payload's ``marker`` file never appeared (the code it names did not run)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not marker.exists(), "the file's code ran"


def snapshot(root) -> dict:
    """Every entry under ``root``: mode, size, mtime, inode and (regular files) content hash, without
    following links or opening FIFOs -- so "nothing was written" can be asserted as before == after."""
    import hashlib
    import os
    import stat
    from pathlib import Path

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


@pytest.fixture(autouse=True)
def _sigint_is_pythons():
    """A shell that starts pytest in the background (``pytest &``) hands it SIGINT ignored; the tests
    that send themselves Ctrl-C need Python's handler (``make`` resets it, so CI never saw this)."""
    import signal
    import threading

    ignored = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def ctrl_c_at_step(monkeypatch, step: int, sig=None) -> list:
    """Ctrl-C (or ``sig``, e.g. SIGTERM) during training step ``step`` (1-based, counted over the run;
    the trainer saves the state after that step); returns the step log (one entry per loss computed)."""
    import signal

    import compressor.trainer as trainer

    sig = signal.SIGINT if sig is None else sig
    real_loss, calls = trainer.dgkd_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            # SIGTERM's default ends the process: only raise it where the trainer took it over
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN), "the trainer does not handle it"
            signal.raise_signal(sig)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "dgkd_loss", loss_then_ctrl_c)
    return calls
