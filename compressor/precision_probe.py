"""How fast a model trains in fp32 and in bf16 autocast on this CPU, measured on a few steps.

Why: on CPUs with native bf16, bf16 autocast + channels_last trains ResNets 1.4-2.4x faster than
fp32 (DESIGN.md section 6, two CPUs), but it trains the depthwise-convolution families *slower*:
MobileNetV2-0.35 at 32 px on a 2-core AMD EPYC with AVX512-BF16, one thread, 1,421 images/s in
fp32 + channels_last against 630 in bf16 + channels_last (docs/performance.md, "bf16 and
depthwise convolutions"). How much depends on the model and the CPU, so ``--mixed-precision
auto`` times both here (:func:`compressor.precision.resolve_precision`) for a model with depthwise
convolutions (:func:`has_depthwise`) instead of deciding by family from one machine; every other
model keeps bf16 unprobed (no model without them trained slower in bf16 here, RegNetY's grouped
convolutions included).

The probe trains a throw-away copy of the model (random weights, random images, lr 0) for one
warm-up step and :data:`PROBE_STEPS` timed steps per precision, the precisions interleaved so a
busy machine slows both alike; the fastest step of each counts. The caller's random state is left
as it was: the run's initialisation and data order do not depend on whether it probed.

The timings are cached per machine (CPU model, cores, threads, torch version) and model (arch,
options, classes, input size, probe batch) in ``$COMPRESS_CACHE`` (default ``~/.cache/compress``)
``/precision_probe.json``, under a file lock: every later run of that model on this machine takes
the same precision, so two runs with one seed stay bit-identical and the paired runs of a study
share their precision, however loaded the machine was when each started. Delete the file to
measure again.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

PROBE_BATCH = 32          # images per probe step (the run's batch when smaller)
PROBE_STEPS = 3           # timed steps per precision, after one warm-up step each
PROBE_MAX_SECONDS = 30.0  # a model whose warm-up steps took longer gets one timed step per precision


def has_depthwise(model: nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (one group per input channel, more than one)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def time_training_steps(build: Callable[[], nn.Module], input_size, num_classes: int, *,
                        batch: int = PROBE_BATCH, steps: int = PROBE_STEPS, channels_last: bool = True,
                        precisions=("no", "bf16")) -> dict:
    """Milliseconds per training image of the model ``build()`` makes, per precision (Accelerate's names:
    ``no`` = fp32, ``bf16`` = bf16 autocast), on the CPU, with this process's thread count.

    Returns ``{"ms_per_image": {precision: ms}, "batch": batch, "steps": steps, "threads": n}``."""
    c, h, w = (int(v) for v in input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # the cost of a step, no change
        x = torch.randn(batch, c, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (batch,))

        def step(precision: str) -> float:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return time.perf_counter() - t0

        warm = sum(step(p) for p in precisions)  # first steps pay for allocation and kernel selection
        steps = 1 if warm > PROBE_MAX_SECONDS else steps
        best = {p: float("inf") for p in precisions}
        for i in range(steps):  # interleaved, the order flipped each round
            for p in (precisions if i % 2 == 0 else tuple(reversed(precisions))):
                best[p] = min(best[p], step(p))
    return {"ms_per_image": {p: round(best[p] * 1000.0 / batch, 4) for p in precisions},
            "batch": batch, "steps": steps, "threads": torch.get_num_threads()}


def _lock(path: Path):
    """An exclusive lock on ``path`` (POSIX ``flock``); no lock where the platform has none."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent first probes may each measure; the last write wins
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def held():
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return held()


def _valid(record) -> bool:
    ms = record.get("ms_per_image") if isinstance(record, dict) else None
    return isinstance(ms, dict) and all(isinstance(ms.get(p), (int, float)) and math.isfinite(ms[p]) and ms[p] > 0
                                        for p in ("no", "bf16"))


def cached_timing(key: str, measure: Callable[[], dict], cache_file: Path | None = None) -> dict:
    """The timing record cached under ``key`` (``cached``: true), else ``measure()``'s, written to the
    cache (``cached``: false). A damaged or edited entry is measured again."""
    from .fileio import write_json
    from .latency import cache_dir

    cache_file = cache_file or cache_dir() / "precision_probe.json"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(cache_file.with_name(cache_file.name + ".lock"))
    except OSError:  # a read-only home: measure every time
        return {**measure(), "cached": False}
    with lock:
        try:
            cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        except (OSError, ValueError):
            cache = {}
        cache = cache if isinstance(cache, dict) else {}
        if _valid(cache.get(key)):
            return {**cache[key], "cached": True}
        record = measure()
        cache[key] = record
        with contextlib.suppress(OSError):
            write_json(cache_file, cache)
    return {**record, "cached": False}


def probe_key(arch: str, model_kwargs: dict, num_classes: int, input_size, batch: int) -> str:
    """The cache key of a probe: this machine and the model as it will train."""
    import torch

    from .machine import cpu_model, usable_cores

    return (f"{cpu_model()}|cores={usable_cores()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|{arch}|{json.dumps(model_kwargs, sort_keys=True, default=str)}|{num_classes}"
            f"|{'x'.join(str(int(v)) for v in input_size)}|batch={batch}")
