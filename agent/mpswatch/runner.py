"""Run a short-lived child with a hard deadline and a bounded output.

A hung MPS control daemon makes its client block forever; the agent must get its
thread back on time, leave no child behind, and never buffer unbounded output.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1 << 20

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Condition()
_starting = 0  # children being started, not yet in _live: kill_all_children waits for them
_stopping = threading.Event()
STOP_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class RunResult:
    """What one child run produced; `timed_out` and `exec_error` exclude a usable exit code."""

    returncode: int | None
    output: str
    duration_seconds: float
    timed_out: bool = False
    exec_error: str | None = None
    truncated: bool = False
    errors: str = ""  # what it wrote to stderr


Runner = Callable[[Sequence[str], bytes, Mapping[str, str], float], RunResult]


def run_with_deadline(
    argv: Sequence[str],
    stdin: bytes,
    env: Mapping[str, str],
    timeout_seconds: float,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
) -> RunResult:
    """Runs argv in its own process group; on deadline or excess output kills the whole group."""
    global _starting
    started = time.monotonic()
    with _live_lock:
        if _stopping.is_set():  # no child may start after kill_all_children looked
            return RunResult(None, "", 0.0, exec_error=f"{argv[0]}: not run, the agent is stopping")
        _starting += 1
    spawned: list[subprocess.Popen[bytes]] = []
    try:
        spawned.append(subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        ))
    except (OSError, ValueError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return RunResult(None, "", time.monotonic() - started, exec_error=f"{argv[0]}: {detail}")
    finally:
        with _live_lock:
            _starting -= 1
            _live.update(spawned)
            _live_lock.notify_all()
    child = spawned[0]
    finished = False
    try:
        result = _communicate(child, stdin, started + timeout_seconds, max_output_bytes)
        finished = not (result.timed_out or result.truncated)
        return RunResult(
            child.returncode if finished else None,
            result.output,
            time.monotonic() - started,
            timed_out=result.timed_out,
            truncated=result.truncated,
            errors=result.errors,
        )
    finally:
        if not finished:
            _kill_group(child)
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
        with _live_lock:
            _live.discard(child)


@dataclass
class _Collected:
    output: str
    errors: str
    timed_out: bool
    truncated: bool


def _communicate(child: subprocess.Popen[bytes], stdin: bytes, deadline: float, cap: int) -> _Collected:
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        child.stdin.write(stdin)
        child.stdin.close()
    except BrokenPipeError:
        pass  # the child exited without reading; its output still tells why
    buffers = {child.stdout.fileno(): bytearray(), child.stderr.fileno(): bytearray()}
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(remaining, 3600.0)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > cap:
                    truncated = True
            if truncated:
                break
    if not (timed_out or truncated):
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True  # closed its output but would not exit
    out, err = (bytes(buffers[s.fileno()][:cap]).decode("utf-8", "replace") for s in (child.stdout, child.stderr))
    return _Collected(out, err, timed_out, truncated)


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel (D state); the zombie is reaped by the next wait or at exit


def stopping() -> bool:
    """True once the agent is killing its children on the way out: a command that ends now ended
    by our hand, and says nothing about the daemon it asked."""
    return _stopping.is_set()


def kill_all_children() -> None:
    """On shutdown or reload: children run in their own sessions, so no signal of ours reaches
    them. Children being started are waited for (a moment at most) and killed with the rest; none
    starts after this."""
    with _live_lock:
        _stopping.set()
        _live_lock.wait_for(lambda: _starting == 0, timeout=STOP_WAIT_SECONDS)
        children = list(_live)
    for child in children:
        _kill_group(child)
