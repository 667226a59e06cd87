"""What the trust model's checks (README "Trust model") add to a cycle, call by call, on this machine:

  - an engine's owner: one read of /proc/<pid>/status per engine and cycle (ProcFS.uid);
  - a log file's checks: an lstat before opening (only when a file is (re)opened: at start, after
    rotation), and lstat instead of stat on every poll;
  - a daemon's dir: stat of the dir for a daemon that is not root's, per discovery.

Each figure is the median of 7 rounds of 2,000 calls, as microseconds a call; the agent's own /proc
(this process) stands for an engine's.

    python -m benchmarks.trust_checks
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

from mpswatch.procfs import ProcFS

CALLS = 2000
ROUNDS = 7


def per_call_us(call: Callable[[], object]) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            call()
        rounds.append((time.perf_counter() - started) / CALLS * 1e6)
    return statistics.median(rounds)


def bare_open(path: str) -> None:
    """How a log file was opened before (the fstat after it was there already)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.fstat(fd)
    os.close(fd)


def checked_open(path: str) -> None:
    """As LogFollower opens one now: lstat before, O_NOFOLLOW, the fstat checked."""
    os.lstat(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.fstat(fd)
    os.close(fd)


def main() -> None:
    procfs = ProcFS()
    pid = os.getpid()
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "control.log")
        with open(log, "w") as handle:
            handle.write("a line\n")
        figures = {
            "engine owner: /proc/<pid>/status read (ProcFS.uid)": per_call_us(lambda: procfs.uid(pid)),
            "log poll: os.stat (before)": per_call_us(lambda: os.stat(log)),
            "log poll: os.lstat (now)": per_call_us(lambda: os.lstat(log)),
            "log open: open + fstat + close (before)": per_call_us(lambda: bare_open(log)),
            "log open: lstat + open O_NOFOLLOW + fstat + close (now)": per_call_us(lambda: checked_open(log)),
            "daemon dir: os.stat of the dir": per_call_us(lambda: os.stat(directory)),
        }
    for name, value in figures.items():
        print(f"{value:8.2f} µs  {name}")


if __name__ == "__main__":
    main()
