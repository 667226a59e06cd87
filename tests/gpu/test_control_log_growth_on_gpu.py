"""Issue 19 on a real daemon: the bytes the agent adds to control.log, per client count, before (every
cycle: mps_control.heartbeat_seconds = 0) and after (on change, the defaults), counted from the file;
then, on change, how fast a new client, a stopped daemon, a daemon that looks alive but does not
answer (frozen in a cgroup of its own: /proc shows it sleeping, not stopped) and a killed one reach
/metrics.

One real daemon; for 0, 2 and 48 idle clients (`mps_client idle`, connected before counting starts),
an agent of each mode in turn watches it for BEFORE_SECONDS and AFTER_SECONDS (one heartbeat and some) and
the growth of control.log over that time is extrapolated to a day. Nothing else sends the daemon a
command while counting. About 7 minutes on an H200. Figures go to $MPSWATCH_GPU_RESULTS as JSON:

    MPSWATCH_GPU_RESULTS=$OUT/control_log_growth.json python -m pytest tests/gpu/test_control_log_growth_on_gpu.py -q -s

MPSWATCH_GPU_CLIENT_COUNTS= (empty) leaves out the growth part: the detection times alone, under a
minute. The frozen daemon needs a writable cgroup v2 hierarchy; without one that part records why
it was skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.gpu.results import results_saver
from tests.kit.agentproc import Agent, key
from tests.kit.realmps import read_line

BEFORE_SECONDS = 30.0
AFTER_SECONDS = 70.0
# MPSWATCH_GPU_CLIENT_COUNTS=2 runs one count (and the freshness part) in about 2 minutes
CLIENT_COUNTS = tuple(int(c) for c in os.environ.get("MPSWATCH_GPU_CLIENT_COUNTS", "0,2,48").split(",") if c.strip())
CGROUP_ROOT = Path("/sys/fs/cgroup")
RESULTS: dict = {}
_save_results = results_saver("MPSWATCH_GPU_RESULTS", RESULTS)


def _idle_client(binary: str, mps) -> subprocess.Popen:
    client = subprocess.Popen([binary, "idle", "3600"], env=mps.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    line = read_line(client)
    assert line.startswith("ready"), line or "no line within 30 s"
    return client


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    """The process frozen in a cgroup v2 of its own, then thawed and moved back, also on failure."""
    home = next(line.split("::", 1)[1] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if line.startswith("0::"))
    cgroup = CGROUP_ROOT / f"mpswatch-test-freeze-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
        try:
            (cgroup / "cgroup.freeze").write_text("1")
            deadline = time.monotonic() + 5
            while "frozen 1" not in (cgroup / "cgroup.events").read_text() and time.monotonic() < deadline:
                time.sleep(0.01)
            yield
        finally:
            (cgroup / "cgroup.freeze").write_text("0")
            (CGROUP_ROOT / home.lstrip("/") / "cgroup.procs").write_text(str(pid))
    finally:
        cgroup.rmdir()


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _grown(mps, heartbeat: float | None, seconds: float) -> dict[str, float]:
    """control.log's growth while one agent of that mode watches (from its first answer on)."""
    pipe, log = str(mps.pipe_dir), mps.log_dir / "control.log"
    env = {} if heartbeat is None else {"MPSWATCH_MPS_CONTROL_HEARTBEAT_SECONDS": str(heartbeat)}
    with Agent(["--pipe-dir", pipe, "--log-dir", str(mps.log_dir)], env=env) as agent:
        agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 1, timeout=20)
        time.sleep(5.0)  # the first full queries (the logs' back-fill is a change) are not the steady cost
        size, started = log.stat().st_size, time.monotonic()
        time.sleep(seconds)
        grown, elapsed = log.stat().st_size - size, time.monotonic() - started
    return {"bytes": grown, "seconds": round(elapsed, 1), "mb_per_day": round(grown * 86400 / elapsed / 1e6, 3)}


def test_control_log_growth_before_and_after_and_freshness_on_change(mps, mps_client):
    mps.start()
    pipe = str(mps.pipe_dir)
    clients: list[subprocess.Popen] = []
    try:
        for count in CLIENT_COUNTS:
            while len(clients) < count:
                clients.append(_idle_client(mps_client, mps))
            time.sleep(1.0)
            before = _grown(mps, 0, BEFORE_SECONDS)
            after = _grown(mps, None, AFTER_SECONDS)
            RESULTS[f"clients_{count}"] = {"before": before, "after": after,
                                           "ratio": round(before["mb_per_day"] / max(after["mb_per_day"], 1e-9), 1)}
            print(f"{count} clients: {RESULTS[f'clients_{count}']}", flush=True)
        if len(clients) >= 48:  # MPS refuses a 49th client: make room for the new one
            gone = clients.pop()
            gone.kill()
            gone.wait()
            time.sleep(2.0)
        if not clients:  # the growth part left out: a server to count the new client on
            clients.append(_idle_client(mps_client, mps))
        with Agent(["--pipe-dir", pipe, "--log-dir", str(mps.log_dir)]) as agent:
            agent.wait_for(lambda s: any(n == "mps_server_clients" for n, _ in s), timeout=20)
            time.sleep(4.0)
            clients.append(_idle_client(mps_client, mps))
            started = time.monotonic()  # its context exists: it has connected
            agent.wait_for(lambda s: sum(v for (n, _), v in s.items() if n == "mps_server_clients") == len(clients),
                           timeout=30, interval=0.05)
            RESULTS["new_client_on_metrics_seconds"] = round(time.monotonic() - started, 2)
            daemon_pid = int(mps.pid_file.read_text())
            os.kill(daemon_pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 0, timeout=30, interval=0.05)
                RESULTS["stopped_daemon_down_seconds"] = round(time.monotonic() - stopped, 2)
            finally:
                os.kill(daemon_pid, signal.SIGCONT)
            agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 1, timeout=30, interval=0.05)
            try:
                with _frozen(daemon_pid):
                    frozen = time.monotonic()
                    state = _proc_state(daemon_pid)
                    agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 0, timeout=30, interval=0.05)
                    RESULTS["frozen_daemon"] = {"proc_state": state, "down_seconds": round(time.monotonic() - frozen, 2)}
            except (OSError, StopIteration) as err:  # no writable cgroup v2 here: say so, go on
                RESULTS["frozen_daemon"] = {"skipped": f"{type(err).__name__}: {err}"}
            agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 1, timeout=30, interval=0.05)
            os.kill(daemon_pid, signal.SIGKILL)
            killed = time.monotonic()
            agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 0, timeout=30, interval=0.05)
            RESULTS["killed_daemon_down_seconds"] = round(time.monotonic() - killed, 2)
    finally:
        for client in clients:
            client.kill()
            client.wait()
    for count in CLIENT_COUNTS:
        row = RESULTS[f"clients_{count}"]
        assert row["after"]["mb_per_day"] < row["before"]["mb_per_day"]
