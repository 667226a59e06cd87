"""Processes of another user for the trust tests: hostile stand-ins and agents run as uid 65534 (nobody).

Each starts as root and drops to its user once its interpreter and imports are loaded, so it also
runs where that user cannot execute the test's interpreter (a pyenv under /root): real, effective and
saved uid and gid all become the user's, no supplementary groups, no capabilities left, and the
process is made dumpable again so that /proc shows it as it shows a process its user started.

    python -m tests.kit.nobody PID[,PID...] AGENT-ARGS...

runs the agent (tests/kit/agent.py, fake NVML without a driver) as nobody, seeing only the given PIDs:
the session's marker (tests/kit/scope.py) is in an environment nobody cannot read, so an agent run
as nobody is told which processes are the test's instead.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from tests.kit.agentproc import Agent, agent_env, free_port

NOBODY = 65534
PR_SET_DUMPABLE = 4
# run by a stand-in: optionally a listening socket of its own (on 127.0.0.1, an ephemeral port), then
# the user's credentials; prints `ready <port or 0>` and sleeps
_STAND_IN = """
import ctypes, os, socket, sys, time
uid = int(os.environ["NOBODY_UID"])
held = None
if os.environ.get("NOBODY_LISTEN"):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
libc = ctypes.CDLL(None, use_errno=True)
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
libc.prctl(4, 1, 0, 0, 0)
print("ready", held.getsockname()[1] if held else 0, flush=True)
time.sleep(600)
"""


def root_can_drop_privileges() -> str | None:
    """Why these helpers cannot run here; None when they can (they need root)."""
    return None if os.geteuid() == 0 else "needs root, to run processes as another user"


def stand_in(argv: list[str], *, argv0: str | None = None, env: dict[str, str] | None = None, uid: int = NOBODY,
             listen: bool = False) -> tuple[subprocess.Popen, int]:
    """A process of user `uid` whose command line is this interpreter's with `argv` after its code (or,
    with `argv0`, `argv0 <interpreter options> argv...`), sleeping; with `listen`, holding a listening
    socket of its own. Returns it once it runs as that user, and the port of its socket (0: none)."""
    extra = {"NOBODY_UID": str(uid), **({"NOBODY_LISTEN": "1"} if listen else {})}
    process = subprocess.Popen([argv0 or sys.executable, "-I", "-S", "-c", _STAND_IN, *argv], executable=sys.executable,
                               env={**(env if env is not None else os.environ), **extra},
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().split() if process.stdout else []
    if line[:1] != ["ready"]:
        process.kill()
        raise RuntimeError(f"stand-in {argv} did not start as uid {uid}")
    return process, int(line[1])


class NobodyAgent(Agent):
    """`mpswatch run` as nobody (python -m tests.kit.nobody), seeing only the processes `visible`,
    scraped as Agent scrapes it."""

    def __init__(self, visible: list[int], args: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kit.nobody", ",".join(map(str, visible)),
             "run", "--listen", f"127.0.0.1:{self.port}", "--log-format", "json", *args],
            env=agent_env(env), stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.wait_healthy()


def drop_privileges(uid: int = NOBODY) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def agent_main(argv: list[str]) -> int:
    # everything the agent imports, imported while the interpreter's files are still readable
    import concurrent.futures.thread  # noqa: F401
    import encodings.idna  # noqa: F401
    import http.server  # noqa: F401
    import json  # noqa: F401
    import urllib.request  # noqa: F401

    from mpswatch.cli import main as mpswatch_main
    from mpswatch.injection import Injected

    from tests.kit import fakenvml
    from tests.kit.agent import scope_the_defaults

    visible = frozenset(int(pid) for pid in argv[0].split(","))
    scope_the_defaults()
    injected = Injected(nvml_loader=fakenvml.no_driver, process_filter=lambda root: visible.__contains__)
    drop_privileges()
    return mpswatch_main(argv[1:], injected=injected)


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
