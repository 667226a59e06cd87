"""A SIGHUP reload of `mpswatch run` (README: Signals): how long /metrics is refused while the
process replaces itself, and how long until every collector has published again; the process's
threads and file descriptors before and after (a reload carries nothing over).

    python -m benchmarks.reload [--quick]     # 20 reloads (--quick: 5)

CPU machine: one fixture daemon answered by the fake control program, the fake H200 NVML.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.kit.agentproc import Agent, key, parse_exposition
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon

COLLECTORS = ("mps_control", "mps_logs", "gpu", "engines", "pods")


def fetch(url: str) -> str | None:
    """The body of a 200, else None (refused, reset, or another status)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.read().decode()
    except (OSError, urllib.error.HTTPError):
        return None


def all_published(body: str | None, pipe_dir: str) -> bool:
    if body is None:
        return False
    samples = parse_exposition(body)
    return samples.get(key("mps_control_up", pipe_dir=pipe_dir)) == 1 and all(
        key("mps_exporter_collector_success", collector=name) in samples for name in COLLECTORS
    )


def process_figures(pid: int) -> dict:
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": len(os.listdir(f"/proc/{pid}/task"))}


def reload_once(agent: Agent, pipe_dir: str) -> dict:
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGHUP)
    refused_at = back_at = None
    while True:
        body = fetch(agent.url + "/metrics")
        now = time.monotonic()
        if refused_at is None:
            if body is None:
                refused_at = now
        elif back_at is None and body is not None:
            back_at = now
        if back_at is not None and all_published(body, pipe_dir):
            return {"refused_after_s": refused_at - sent, "refused_for_s": back_at - refused_at,
                    "fresh_after_s": now - sent}
        if now - sent > 30:
            raise RuntimeError("the agent did not come back within 30 s of SIGHUP")
        time.sleep(0.005)


def main() -> None:
    rounds = 5 if "--quick" in sys.argv[1:] else 20
    work = Path(tempfile.mkdtemp(prefix="mpswatch-reload-"))
    daemon = FakeDaemon(work, "healthy_two_clients_driver580")
    args = ["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", daemon.path, "--log-dir", str(work)]
    try:
        with Agent(args, log_path=work / "agent.log", nvml="h200") as agent:
            deadline = time.monotonic() + 30
            while not all_published(fetch(agent.url + "/metrics"), daemon.path):
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent never published every collector")
                time.sleep(0.05)
            before = process_figures(agent.proc.pid)
            results = [reload_once(agent, daemon.path) for _ in range(rounds)]
            time.sleep(3)  # a few cycles on the last start
            after = process_figures(agent.proc.pid)
            assert agent.proc.poll() is None
    finally:
        daemon.close()
    summary = {"rounds": rounds, "before": before, "after": after}
    for figure in ("refused_after_s", "refused_for_s", "fresh_after_s"):
        values = [r[figure] for r in results]
        summary[figure] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
