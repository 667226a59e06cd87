"""Run a short-lived child with a hard deadline and a bounded output.

A hung MPS control daemon makes its client block forever; the agent must get its
thread back on time, leave no child behind, and never buffer unbounded output.

The run ends when the child exits, not when its output pipes close: a descendant that inherited
them (a grandchild left running) cannot hold the reader until the deadline; it is killed with the
child's process group. At the deadline the child's own state tells a hang from a busy node: a
child blocked in the kernel waiting (state S, as on a hung or stopped daemon's socket) or stopped
is out of time, while one that is runnable but starved of CPU or in uninterruptible wait (R, D:
slow to start on a saturated node) gets the deadline once more.
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
from typing import Protocol

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
    # extra time given once because at the deadline the child was runnable but starved (0: none);
    # `starved_detail` says what was seen (its state, CPU time used, the node's CPU pressure)
    grace_seconds: float = 0.0
    starved_detail: str = ""


class Runner(Protocol):
    """run_with_deadline's shape: what the MPS control collector calls, and what tests inject."""

    def __call__(self, argv: Sequence[str], stdin: bytes, env: Mapping[str, str], timeout_seconds: float, /, *,
                 give_up: Callable[[], bool] | None = None) -> RunResult: ...


def run_with_deadline(
    argv: Sequence[str],
    stdin: bytes,
    env: Mapping[str, str],
    timeout_seconds: float,
    max_output_bytes: int = MAX_OUTPUT_BYTES,
    *,
    give_up: Callable[[], bool] | None = None,
) -> RunResult:
    """Runs argv in its own process group; on deadline or excess output kills the whole group.
    `give_up`, asked at the deadline, says that more time cannot help (the daemon the child talks to
    is stopped): then a starved child gets no second deadline either."""
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
        result = _communicate(child, stdin, started + timeout_seconds, timeout_seconds, max_output_bytes, give_up)
        finished = not (result.timed_out or result.truncated)
        return RunResult(
            child.returncode if finished else None,
            result.output,
            time.monotonic() - started,
            timed_out=result.timed_out,
            truncated=result.truncated,
            errors=result.errors,
            grace_seconds=result.grace_seconds,
            starved_detail=result.starved_detail,
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
    grace_seconds: float = 0.0
    starved_detail: str = ""


def _exit_watch(child: subprocess.Popen[bytes]) -> int | None:
    """A pidfd that turns readable when the child exits (Linux 5.3 and later), or None: then the
    loop polls the child's exit every _EXIT_POLL_SECONDS."""
    try:
        return os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        return None


_EXIT_POLL_SECONDS = 0.02


def _has_exited(child: subprocess.Popen[bytes]) -> bool:
    """Without reaping it: its PID, and so its process group, stays ours to kill."""
    try:
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def starved(pid: int, proc_root: str = "/proc") -> str | None:
    """What shows that child `pid` is held back by the node rather than waiting on its daemon: its
    state R (runnable: running or waiting for a CPU) or D (uninterruptible, as while paging its
    program in), with the CPU time it got so far and the node's CPU pressure; None when it is
    blocked waiting (S), stopped (T, t) or gone."""
    try:
        with open(f"{proc_root}/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] not in ("R", "D"):
        return None
    try:
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        cpu = float("nan")
    return f"state {fields[0]}, {cpu:.2f} s of CPU so far{_cpu_pressure(proc_root)}"


def _cpu_pressure(proc_root: str) -> str:
    try:
        with open(f"{proc_root}/pressure/cpu") as handle:
            some = handle.readline().split()
    except OSError:
        return ""
    avg10 = next((word.partition("=")[2] for word in some if word.startswith("avg10=")), "")
    return f", node CPU pressure some avg10={avg10}%" if avg10 else ""


def _communicate(
    child: subprocess.Popen[bytes], stdin: bytes, deadline: float, grace: float, cap: int,
    give_up: Callable[[], bool] | None,
) -> _Collected:
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        child.stdin.write(stdin)
        child.stdin.close()
    except BrokenPipeError:
        pass  # the child exited without reading; its output still tells why
    buffers = {child.stdout.fileno(): bytearray(), child.stderr.fileno(): bytearray()}
    timed_out = truncated = exited = False
    grace_used, starved_detail = 0.0, ""
    exit_fd = _exit_watch(child)
    try:
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                selector.register(fd, selectors.EVENT_READ)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ)
            while len(selector.get_map()) > (0 if exit_fd is None or exited else 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    detail = None if grace_used or (give_up is not None and give_up()) else starved(child.pid)
                    if detail is None:
                        timed_out = True
                        break
                    grace_used, starved_detail, deadline = grace, detail, deadline + grace
                    continue
                wait = min(remaining, 3600.0 if exit_fd is not None else _EXIT_POLL_SECONDS)
                # once the child has exited, only what its pipes already hold is read: no waiting
                for key, _ in selector.select(0 if exited else wait):
                    if key.fd == exit_fd:
                        selector.unregister(exit_fd)
                        exited = True
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    buffers[key.fd] += chunk
                    if len(buffers[key.fd]) > cap:
                        truncated = True
                if truncated:
                    break
                if exited and not selector.select(0):
                    break  # exited, and its pipes hold nothing more (a descendant may keep them open)
                if exit_fd is None and not exited:
                    exited = _has_exited(child)
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    if exited and not truncated:
        _signal_group(child)  # what it left running, holding its pipes; its PID is not reaped yet
    if not (timed_out or truncated):
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True  # closed its output but would not exit
    out, err = (bytes(buffers[s.fileno()][:cap]).decode("utf-8", "replace") for s in (child.stdout, child.stderr))
    return _Collected(out, err, timed_out, truncated, grace_used, starved_detail)


def _signal_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    _signal_group(child)
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
