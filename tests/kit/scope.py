"""The test session's scope: which processes and directories are this session's.

Importing the kit (tests/kit/__init__.py) makes a directory unique to the session and puts its
path in this process's environment as TESTKIT_SCOPE, unless the environment already names one
(a process the kit started joins its parent's session). Every process started from here on
inherits it: fakes, stand-in daemons, fake engines, real MPS daemons and their servers and clients,
agents. An agent under test (tests/kit/agent.py) sees only the processes carrying this session's
TESTKIT_SCOPE (SessionProcesses), and its default pipe, log and device-plugin dirs, kubelet socket
and config file lie inside the scope's directory (SCOPED_DEFAULTS); so MPS daemons, engines, kubelets
and test suites running beside the session, including another copy of this suite, stay out of what
its agents see.

Not MPSWATCH_-prefixed: the agent's configuration refuses MPSWATCH_ variables it does not know.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

from mpswatch.procfs import read_file

VARIABLE = "TESTKIT_SCOPE"


def _begin() -> str:
    directory = tempfile.mkdtemp(prefix="mpswatch-test-scope-")
    atexit.register(shutil.rmtree, directory, True)
    os.environ[VARIABLE] = directory
    return directory


DIRECTORY = Path(os.environ.get(VARIABLE) or _begin())

# what an agent under test finds without being told is looked for inside the scope's directory (never
# made by the kit: a test that wants something found there puts it there); setting key -> default
SCOPED_DEFAULTS = {
    "mps_control.default_pipe_dirs": (str(DIRECTORY / "default-pipe-dir"),),
    "device_plugin_root": str(DIRECTORY / "device-plugin-root"),
    "mps_logs.default_log_dir": str(DIRECTORY / "default-log-dir"),
    "pods.pod_resources_socket": str(DIRECTORY / "kubelet.sock"),
}
DEFAULT_CONFIG_FILE = DIRECTORY / "config.toml"  # instead of /etc/mpswatch/config.toml

SETTLED_SECONDS = 1.0  # a process this old has made its exec: its environment no longer changes
RECHECK_SECONDS = 5.0  # PIDs are handed out in order: one is reused only after they wrap, minutes apart
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class SessionProcesses:
    """The process filter of an agent under test: true for the processes whose environment carries
    this session's TESTKIT_SCOPE. Cheap enough for every listing of every cycle: each answer is kept
    by PID, checked again against the process's start time every few seconds (a PID reused by a new
    process is asked again), and only once the process has run long enough to have made its exec (a
    child between fork and exec still has its parent's environment). It reads the machine's /proc
    (filter_for gives none to an agent reading a /proc of the test's own)."""

    def __init__(self) -> None:
        self._entry = f"\0{VARIABLE}={DIRECTORY}\0".encode()
        self._known: dict[int, tuple[int, bool, float]] = {}  # pid -> (start time in clock ticks, visible, checked at)

    def __call__(self, pid: int) -> bool:
        now = time.monotonic()
        known = self._known.get(pid)
        if known is not None and now - known[2] < RECHECK_SECONDS:
            return known[1]
        started = self._start_ticks(pid)
        if started is None:
            self._known.pop(pid, None)
            return False
        visible = known[1] if known is not None and known[0] == started else self._carries_scope(pid)
        if time.clock_gettime(time.CLOCK_BOOTTIME) - started / _CLOCK_TICKS >= SETTLED_SECONDS:
            self._known[pid] = (started, visible, now)
        return visible

    def _start_ticks(self, pid: int) -> int | None:
        try:
            stat = read_file(f"/proc/{pid}/stat")
        except OSError:
            return None
        fields = stat.rpartition(b")")[2].split()
        return int(fields[19]) if len(fields) > 19 else None

    def _carries_scope(self, pid: int) -> bool:
        try:
            return self._entry in b"\0" + read_file(f"/proc/{pid}/environ")
        except OSError:  # gone, or another user's
            return False


def filter_for(proc_root: str) -> SessionProcesses | None:
    """Injected.process_filter of an agent under test: this session's processes where the agent reads
    the machine's /proc; none where a test gave it a /proc of its own, which holds only what the test
    wrote there."""
    return SessionProcesses() if os.path.realpath(proc_root) == "/proc" else None
