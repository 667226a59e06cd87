"""Issue 19 through a whole agent: its MPS logs followed, a quiet daemon is left alone, and a client the
server log announces reaches /metrics at once (the liveness query would not show it: the server list is
the same, and the heartbeat is a minute away)."""

from __future__ import annotations

import time

from tests.kit.agentproc import Agent, key
from tests.kit.fakedaemon import FAKE_CONTROL

NEW_CLIENT_ROW = "439       3         476            GPU-2ea0ea17-0206-eb44    4026531836     python3        \n"
NEW_CLIENT_LINE = "[2026-12-04 10:00:00.000 Server   476] Client {PID: 439, Context ID: 0} connected\n"


def clients(samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "mps_server_clients")


def test_a_quiet_daemon_is_left_alone_and_a_client_the_log_announces_reaches_metrics(fake_daemon, tmp_path):
    daemon = fake_daemon("healthy_two_clients_driver580")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    for name in ("control.log", "server.log"):
        (log_dir / name).touch()
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--pipe-dir", daemon.path, "--log-dir", str(log_dir)]
    with Agent(args, env={"MPSWATCH_MPS_LOGS_INTERVAL_SECONDS": "0.5"}) as agent:
        on_change = key("mps_control_poll_mode", pipe_dir=daemon.path, mode="on_change")
        agent.wait_for(lambda s: s.get(on_change) == 1 and clients(s) == 2, timeout=15)
        time.sleep(1.5)  # the full queries of the start (the logs' first read is a change)
        before = len(daemon.commands())
        time.sleep(3.0)  # six cycles
        assert "ps" not in daemon.commands()[before:] and len(daemon.commands()[before:]) <= 2
        daemon.update(replies={**daemon.scenario["replies"], "ps": daemon.scenario["replies"]["ps"] + NEW_CLIENT_ROW})
        with open(log_dir / "server.log", "a") as log:
            log.write(NEW_CLIENT_LINE)
        agent.wait_for(lambda s: clients(s) == 3, timeout=7.0)  # within the liveness interval: the log did it
