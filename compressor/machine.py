"""The machine this process runs on: usable CPU cores and the CPU model (one home for both).

Used by latency planning (cache keys, default threads) and by the deployment
package's benchmark reports (``export.machine``).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
