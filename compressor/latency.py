"""Batch-1 CPU latency of zoo models, in torch eager or onnxruntime.

Latency planning needs numbers from *this* machine, so onnxruntime latencies
are cached per machine (CPU model, core count, thread count, versions) in
``$COMPRESS_CACHE`` (default ``~/.cache/compress``)/``latency.json``.
Torch-eager figures are cheap and are not cached.

Layers: planning (this library) must not depend on deployment. Timing a model
in onnxruntime needs the ``export`` package, so the measurement is injected: an
:data:`OnnxTimer` ``timer(model, meta, threads=, warmup=, iters=[, seconds=]) -> ms`` passed
as ``timer=`` or installed once with :func:`set_onnx_timer` (``compressor.cli``
installs ``export.bench.onnx_model_latency_ms``). Nothing under ``compressor/``
but the CLI imports ``export``.

The latency column of a finished run (summary, ``report.md``, plot) comes from
:func:`chain_latency`: measured once after training, on the main process, in
onnxruntime with ``compress bench``'s default settings.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import CompressError
from .fileio import write_json
from .machine import cpu_model, usable_cores
from .models import create_model, get_entry

OnnxTimer = Callable[..., float]
_onnx_timer: OnnxTimer | None = None


class NoOnnxTimer(CompressError):
    """onnxruntime latency was asked for where no timer is installed (a setup error, not a model's)."""


def failure_text(exc: BaseException) -> str:
    """Why a model got no latency, in one short line: ``Type: first line of the message``."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}"


def set_onnx_timer(timer: OnnxTimer | None) -> OnnxTimer | None:
    """Install the onnxruntime latency measurement (see the module docstring); returns the previous one."""
    global _onnx_timer
    previous, _onnx_timer = _onnx_timer, timer
    return previous


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def machine_key(threads: int) -> str:
    import onnxruntime

    return (f"{cpu_model()}|cores={usable_cores()}|threads={threads}|ort={onnxruntime.__version__}"
            f"|torch={torch.__version__}")


def _time_fn(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _default_threads() -> int:
    return max(1, min(usable_cores(), 4))


def torch_latency_ms(arch: str, num_classes: int = 10, model_kwargs: dict | None = None,
                     threads: int | None = None, warmup: int = 5, iters: int = 30, input_size=None) -> float:
    """Median batch-1 latency of the torch eager model (random weights) at ``input_size`` (default: its own)."""
    entry = get_entry(arch)
    size = tuple(input_size) if input_size else entry.input_size
    model = create_model(arch, num_classes=num_classes, in_chans=size[0], **(model_kwargs or {})).eval()
    x = torch.randn(1, *size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or _default_threads())
    try:
        with torch.inference_mode():
            return _time_fn(lambda: model(x), warmup, iters)
    finally:
        torch.set_num_threads(previous)


def onnx_latency_ms(arch: str, num_classes: int = 10, model_kwargs: dict | None = None,
                    threads: int | None = None, warmup: int = 10, iters: int = 50, use_cache: bool = True,
                    input_size=None, timer: OnnxTimer | None = None, seconds: float | None = None) -> float:
    """Median batch-1 onnxruntime latency on this machine (cached per machine).

    A cache miss measures with ``timer`` (else the one of :func:`set_onnx_timer`); ``seconds``
    (passed on to the timer when given): time that long instead of ``iters`` calls."""
    threads = threads or _default_threads()
    entry = get_entry(arch)
    size = tuple(input_size) if input_size else entry.input_size
    key = f"{machine_key(threads)}|{arch}|{num_classes}|{json.dumps(model_kwargs or {}, sort_keys=True)}"
    if size != entry.input_size:
        key += f"|{'x'.join(map(str, size))}"
    if entry.user_ref:  # user code can change under the same name
        from .models.user import code_sha256

        key += f"|{code_sha256(entry.user_ref)}"
    cache_file = cache_dir() / "latency.json"
    cache = {}
    if use_cache and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        cached = cache.get(key) if isinstance(cache, dict) else None
        if isinstance(cached, (int, float)) and math.isfinite(cached) and cached > 0:
            return float(cached)  # anything else (a damaged or edited cache) is measured again
        if not isinstance(cache, dict):
            cache = {}
    timer = timer or _onnx_timer
    if timer is None:
        raise NoOnnxTimer("onnxruntime latency needs the deployment package's timer (the compress CLI installs "
                            "it); from Python call compressor.latency.set_onnx_timer(export.bench."
                            "onnx_model_latency_ms), or use --latency-backend torch|none")
    from .checkpoint import meta_for

    model = create_model(arch, num_classes=num_classes, in_chans=size[0], **(model_kwargs or {})).eval()
    meta = meta_for(entry.name, num_classes=num_classes, in_chans=size[0], model_kwargs=model_kwargs or {},
                    input_size=size)
    extra = {} if seconds is None else {"seconds": float(seconds)}
    ms = float(timer(model, meta, threads=threads, warmup=warmup, iters=iters, **extra))
    if use_cache:
        cache[key] = ms
        try:
            write_json(cache_file, cache)
        except OSError:
            pass  # a read-only home must not break planning
    return ms


def latency_ms(arch: str, backend: str = "torch", **kwargs) -> float:
    if backend == "onnxruntime":
        return onnx_latency_ms(arch, **kwargs)
    return torch_latency_ms(arch, **kwargs)


# ------------------------------------------------- the run table's latency
BENCH_MAX_THREADS = 8   # = export.machine.MAX_DEFAULT_THREADS (the library does not import export)


def bench_threads() -> int:
    """The intra-op threads ``compress bench`` uses by default: the usable cores, at most 8."""
    return max(1, min(usable_cores(), BENCH_MAX_THREADS))


def chain_latency(members, *, num_classes: int, input_size=None, backend: str = "onnxruntime",
                  timer: OnnxTimer | None = None, warmup: int = 10, seconds: float = 1.0) -> tuple[list, dict]:
    """Batch-1 latency of every model of a finished run, in the deployed runtime.

    ``members``: ``(arch, model_kwargs)`` pairs. Each is built at ``input_size`` and timed
    once, uncached, with the onnxruntime timer (``timer``, else :func:`set_onnx_timer`'s):
    fp32, CPU, :func:`bench_threads` threads and graph optimisation ``all`` -- what
    ``compress bench`` does by default -- the median (p50) of ``seconds`` of calls in
    3 rounds after ``warmup``. Call it on one process after training (the pipeline's main process
    while the others wait), so nothing else of the run competes for the cores.
    Returns ``(latencies_ms, info)``; with ``backend="none"`` or no timer installed,
    latencies are ``None`` and ``info["note"]`` says why.
    """
    members = list(members)
    timer = timer or _onnx_timer
    if backend == "none" or timer is None:
        why = ("--latency-backend none" if backend == "none" else
               "no onnxruntime timer installed (from Python: compressor.latency.set_onnx_timer("
               "export.bench.onnx_model_latency_ms))")
        return [None] * len(members), {"backend": "none", "note": f"latency not measured: {why}"}
    threads = bench_threads()
    out, failed = [], {}
    for arch, kwargs in members:
        try:
            out.append(round(onnx_latency_ms(arch, num_classes=num_classes, model_kwargs=kwargs, threads=threads,
                                             warmup=warmup, use_cache=False, input_size=input_size, timer=timer,
                                             seconds=seconds), 4))
        except Exception as exc:  # a model that does not export must not fail a finished run: say so instead
            out.append(None)
            failed[arch] = failure_text(exc)
    info = {"backend": "onnxruntime", "precision": "fp32", "provider": "cpu", "batch_size": 1, "threads": threads,
            "statistic": "p50", "warmup": int(warmup), "seconds": float(seconds),
            "when": "once, after training, on the main process"}
    if failed:
        info["failed"] = failed
    return out, info


def describe_latency(info: dict | None, legacy_backend: str | None = None) -> str:
    """One line saying how a run table's latency column was measured."""
    if not info:  # a summary written before the run table's latency was measured after training
        return {"torch": "latency: torch eager, batch 1, measured when the run was planned",
                "onnxruntime": "latency: onnxruntime, batch 1, measured when the run was planned"}.get(
            legacy_backend or "", "latency: not measured")
    if info.get("backend") != "onnxruntime":
        return info.get("note", "latency: not measured")
    line = (f"latency: onnxruntime {info['precision']} on the CPU, batch {info['batch_size']}, {info['statistic']} "
            f"of {info['seconds']:g} s of calls, {info['threads']} threads (as 'compress bench'), measured "
            f"{info['when']}")
    failed = info.get("failed") or {}
    return line + "".join(f"; not measured for {arch} ({why})" for arch, why in failed.items())
