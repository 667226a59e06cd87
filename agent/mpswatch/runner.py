"""Run a short-lived child with a hard deadline and a bounded output.

A hung MPS control daemon makes its client block forever; the agent must get its
thread back on time, leave no child behind, and never buffer unbounded output.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

MAX_OUTPUT_BYTES = 1 << 20


@dataclass(frozen=True)
class RunResult:
    """What one child run produced; `timed_out` and `exec_error` exclude a usable exit code."""

    returncode: int | None
    output: str
    duration_seconds: float
    timed_out: bool = False
    exec_error: str | None = None
    truncated: bool = False


Runner = Callable[[Sequence[str], bytes, Mapping[str, str], float], RunResult]


def run_with_deadline(
    argv: Sequence[str],
    stdin: bytes,
    env: Mapping[str, str],
    timeout_seconds: float,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> RunResult:
    """Runs argv in its own process group; on deadline or excess output kills the whole group."""
    started = time.monotonic()
    try:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as err:
        return RunResult(None, "", time.monotonic() - started, exec_error=f"{argv[0]}: {err.strerror or err}")

    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(stdin)
        child.stdin.close()
    except BrokenPipeError:
        pass  # the child exited without reading; its output still tells why

    deadline = started + timeout_seconds
    chunks: list[bytes] = []
    size = 0
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not selector.select(remaining):
                continue
            chunk = os.read(child.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_output_bytes:
                truncated = True
                break

    if timed_out or truncated:
        _kill_group(child)
    else:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True  # closed its output but would not exit
            _kill_group(child)
    child.stdout.close()
    output = b"".join(chunks)[:max_output_bytes].decode("utf-8", errors="replace")
    return RunResult(
        None if timed_out or truncated else child.returncode,
        output,
        time.monotonic() - started,
        timed_out=timed_out,
        truncated=truncated,
    )


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        child.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel (D state); the zombie is reaped by the next wait or at exit
