"""Atomic file writing: nothing half-written ever looks valid.

Every file the toolkit produces goes through :func:`atomic_write`: the content
is written to a temporary file in the destination folder, flushed and fsynced,
then renamed over the destination (``os.replace`` is atomic on POSIX). A crash
leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from .errors import CompressError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (exit 2) when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CompressError(f"output path {str(path)!r} is a directory; give a file name")
    if not parent.exists():
        raise CompressError(f"output folder {str(parent)!r} does not exist; create it first or choose another --out")
    if not os.access(parent, os.W_OK):
        raise CompressError(f"output folder {str(parent)!r} is not writable; choose another --out")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path, obj) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line (a torn last line is skipped by :func:`read_jsonl`)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path) -> list[dict]:
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    return out
