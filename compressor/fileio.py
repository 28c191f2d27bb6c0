"""Atomic file writing: nothing half-written ever looks valid.

Every file the toolkit produces goes through :func:`atomic_write`: the content
is written to a temporary file in the destination folder, flushed and fsynced,
then renamed over the destination (``os.replace`` is atomic on POSIX). A crash
leaves either the old file or the new one, never a torn one.

Temporary files are named ``.compress-tmp.<pid>.<name>.<random>[.suffix].tmp``.
A process killed before the rename (SIGKILL, power loss) leaves its temporary
file behind; the next write into the same folder removes such leftovers of
processes that no longer run (:func:`remove_stale_tmp`), never those of a live one.

:func:`check_output_path` is the one rule for output paths: a writable folder, not
a directory, and never one of the command's own input files (same path, same file
through a symlink, or a hard link of it).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import yaml

from .errors import CompressError

_UMASK = os.umask(0)
os.umask(_UMASK)
TMP_PREFIX = ".compress-tmp."
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"(\d+)\.")
_STARTED = time.time()
_CLEANED: set = set()  # folders remove_stale_tmp has looked at in this process
MAX_ECHO = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def shorten(value, limit: int = MAX_ECHO) -> str:
    """``value`` as text fit to echo in a one-line message: control characters (newlines
    included) become one space, and at most ``limit`` characters are kept (``...`` marks a cut).

    Every message that echoes something read from a file (metadata, a recipe value, a
    source string) goes through this, so a crafted file can neither forge an output line
    nor make a 10 MB error line."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, BaseException) else repr(value)
    if len(text) > 4 * limit:
        text = text[: 4 * limit]
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file: the same resolved path, or the same
    inode (a hard link or a symlink to it)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop resolves to nothing: not an existing input
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output_path(path: str | os.PathLike, inputs=()) -> Path:
    """Fail early (exit 2) when ``path`` cannot be written, or would replace one of ``inputs``
    (the files the command reads: a model, a baseline, a recipe ...)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CompressError(f"output path {shorten(str(path))!r} is a directory; give a file name")
    for source in inputs or ():
        if source is not None and str(source) and same_file(path, source):
            raise CompressError(f"output {shorten(str(path))!r} is the input file {shorten(str(source))!r}; "
                                f"writing it would destroy the input: choose another output path")
    if not parent.exists():
        raise CompressError(f"output folder {shorten(str(parent))!r} does not exist; create it first or choose "
                            f"another --out")
    if not os.access(parent, os.W_OK):
        raise CompressError(f"output folder {shorten(str(parent))!r} is not writable; choose another --out")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process (or unknowable): leave its file alone
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete ``.compress-tmp.<pid>.*`` files in ``folder`` left by processes that no longer run
    and that are older than this process; returns how many were removed. Each folder is looked
    at once per process."""
    key = os.path.realpath(folder)
    if key in _CLEANED:
        return 0
    _CLEANED.add(key)
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= _STARTED:
                continue
            if _pid_alive(int(m.group(1))):
                continue
            os.unlink(entry.path)
            removed += 1
        except (OSError, ValueError):
            continue
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}.{path.name[:100]}.", suffix=suffix + ".tmp",
                               dir=path.parent)
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


class _PlainDumper(yaml.SafeDumper):
    """Writes a value shared by two keys twice instead of as an anchor and alias: the files we
    write are read back by a loader that refuses aliases (:func:`compressor.config.load_yaml`)."""

    def ignore_aliases(self, data):
        return True


def write_yaml(path, obj) -> None:
    write_text(path, yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False))


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
