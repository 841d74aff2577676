"""What the CPU reports it can do, without torch (the int8 query path runs without it)."""
from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The words of Linux's /proc/cpuinfo (x86 `flags`, Arm `Features`, among the rest); None where it cannot
    be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(f.read().split())
    except OSError:
        return None
