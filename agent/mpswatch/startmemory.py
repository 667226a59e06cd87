"""Once the agent has started, what starting left behind is given back (issue 19).

A start imports some 340 modules; where a package has no bytecode (a `.pyc`-less install, an image
that strips them, PYTHONDONTWRITEBYTECODE) every start compiles it, and the compiler's work is freed
into malloc's heaps, where it stays resident: nvidia-ml-py alone leaves 17 MiB that way. After every
collector has run once (the GPU collector imports NVML on its first cycle), the start's garbage is
collected and glibc is asked to return its free pages (malloc_trim; 11 of those 17 MiB,
docs/benchmarks.md). Where libc is not glibc the last step is skipped. (gc.freeze was tried too: it
frees nothing, and the quick CPU runs showed no gain from it.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections.abc import Callable, Collection

import structlog

from mpswatch.snapshot import NodeSnapshot

FIRST_CYCLES_WAIT_SECONDS = 60.0  # a collector slower than this to first publish does not hold it up longer
POLL_SECONDS = 0.5


def _resident_kib() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): free pages of every arena back to the kernel. False where unavailable."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def release() -> dict[str, int | bool | None]:
    """Collects and trims; the resident KiB before and after."""
    before = _resident_kib()
    gc.collect()
    trimmed = malloc_trim()
    return {"rss_kib_before": before, "rss_kib_after": _resident_kib(), "malloc_trim": trimmed}


def release_after_first_cycles(current: Callable[[], NodeSnapshot], collectors: Collection[str],
                               stop: threading.Event) -> None:
    """On a thread of its own: waits until each of `collectors` has published once (at most
    FIRST_CYCLES_WAIT_SECONDS), then release(), logged."""

    def wait_then_release() -> None:
        deadline = time.monotonic() + FIRST_CYCLES_WAIT_SECONDS
        while not set(collectors) <= set(current().statuses) and time.monotonic() < deadline:
            if stop.wait(POLL_SECONDS):
                return
        structlog.get_logger().info("start_memory_released", **release())

    threading.Thread(target=wait_then_release, name="start-memory", daemon=True).start()
