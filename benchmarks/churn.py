"""Memory, file descriptors and threads of the agent over a run with client churn, and freshness:
how long a daemon's hang or death takes to show as `mps_control_up 0` on /metrics.

    python -m benchmarks.churn [--quick]     # 600 s of churn (--quick: 60 s)

CPU machine: the MPS replies come from the fake control program's replay mode, rewritten every 2 s
with new client PIDs (a client starting and exiting every few seconds), and a fault's lines are
appended to server.log every minute; the hang and death of the daemon are played by its scenario mode.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.node_cost import rss_mib
from tests.kit.agentproc import Agent
from tests.kit.fakecontrol import write_reply
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon
from tests.kit.stagednode import PS_HEADER, make_daemon

FAULT = [
    "Client {{PID: {pid}, Context: 1}} encountered a fatal GPU error.",
    "Server is handling a fatal GPU error.",
    "Client {{PID: {pid}, Context ID: 1}} on device 0 to be torn down",
]


def stamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def process_figures(pid: int) -> dict:
    return {"rss_mib": rss_mib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def churn(seconds: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mpswatch-churn-"))
    pipe = make_daemon(work, 1, [[1000, 1001]])
    log_dir = work / "log"
    log_dir.mkdir()
    server_log = log_dir / "server.log"
    server_log.touch()
    faults = 0
    with Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", str(pipe), "--log-dir", str(log_dir)],
               nvml="h200", log_path=work / "agent.log") as agent:
        time.sleep(5)
        start = process_figures(agent.proc.pid)
        started = time.monotonic()
        pid, last_fault = 2000, started
        while time.monotonic() - started < seconds:
            pid += 1  # one client leaves, another arrives
            rows = [f"{p:<10}{i + 1:<10}{476:<15}{'GPU-00000000-2b6d-037a':<26}{4026531836:<15}{'python3':<15}\n"
                    for i, p in enumerate((1000, pid))]
            write_reply(pipe, "ps", PS_HEADER + "".join(rows))
            with open(server_log, "a") as log:
                log.write(f"[{stamp()} Server   476] Client {{PID: {pid}, Context ID: 0}} connected\n")
                log.write(f"[{stamp()} Server   476] Client process {pid - 1} disconnected\n")
                if time.monotonic() - last_fault >= 60:
                    log.writelines(f"[{stamp()} Server   476] {line.format(pid=pid)}\n" for line in FAULT)
                    faults, last_fault = faults + 1, time.monotonic()
            time.sleep(2)
        time.sleep(3)
        end = process_figures(agent.proc.pid)
        samples = agent.scrape()
        counted = {dict(l)["event"]: v for (m, l), v in samples.items()
                   if m == "mps_log_events_total" and dict(l)["source"] == "server" and v}
    connected = pid - 2000
    return {"seconds": seconds, "start": start, "end": end, "clients_connected_written": connected,
            "client_connected_counted": counted.get("client_connected"), "faults_written": faults,
            "fatal_gpu_error_counted": counted.get("fatal_gpu_error", 0.0)}


def freshness(rounds: int) -> dict:
    """Seconds from a hang or a death to mps_control_up 0 on /metrics, at the default 2 s interval."""
    out: dict[str, list[float]] = {"hang": [], "death": []}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = FakeDaemon(Path(tmp), "healthy_two_clients_driver580")
        up = ("mps_control_up", frozenset({("pipe_dir", daemon.path)}))
        try:
            with Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", daemon.path]) as agent:
                for _ in range(rounds):
                    for kind, mode in (("hang", "hang"), ("death", "not_running")):
                        agent.wait_for(lambda s: s.get(up) == 1, timeout=15)
                        time.sleep(1.3)  # land anywhere in the 2 s cycle
                        daemon.update(mode=mode)
                        began = time.monotonic()
                        agent.wait_for(lambda s: s.get(up) == 0, timeout=15, interval=0.05)
                        out[kind].append(time.monotonic() - began)
                        daemon.update(mode="answer")
        finally:
            daemon.close()
    return {kind: {"median_s": statistics.median(v), "max_s": max(v), "rounds": len(v)} for kind, v in out.items()}


def main() -> None:
    quick = "--quick" in sys.argv
    result = {"freshness": freshness(3 if quick else 10), "churn": churn(60.0 if quick else 600.0)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
