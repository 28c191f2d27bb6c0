"""The machine a measurement ran on: CPU model, cores, versions, default thread count.

Leaf module of the export package (imports nothing of it), so that the
runtime, the benchmark and the provider checks can all use it without an
import circle. Cores and CPU model come from :mod:`compressor.machine`.
"""
from __future__ import annotations

import os
import platform

from compressor.machine import cpu_model, usable_cores

__all__ = ["MAX_DEFAULT_THREADS", "cpu_model", "default_threads", "machine_info", "usable_cores", "versions"]

MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Intra-op threads when none are given: the usable cores, capped at 8.

    Small CNNs stop scaling long before that, and more threads only add
    synchronisation noise to latency measurements.
    """
    return max(1, min(usable_cores(), MAX_DEFAULT_THREADS))


def machine_info() -> dict:
    usable = usable_cores()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("onnxruntime", "torch", "onnx", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    try:
        from importlib.metadata import version

        out["compress"] = version("compress")
    except Exception:
        out["compress"] = None
    return out
