"""`mpswatch run` and `status` reading MPS logs that a test writes while they run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

from tests.kit.agentproc import Agent, agent_env, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL

INTERVAL = 0.5
LOGS_ENV = {"MPSWATCH_MPS_LOGS_INTERVAL_SECONDS": str(INTERVAL)}


def stamp(offset: float = 0.0) -> str:
    moment = datetime.fromtimestamp(time.time() + offset)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def write(path, *messages, tag="Server", pid=486, offset=0.0):
    with open(path, "a") as handle:
        for message in messages:
            handle.write(f"[{stamp(offset)} {tag}   {pid}] {message}\n")


def test_counters_and_last_event_times_move_within_two_cycles(tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    server, control = log_dir / "server.log", log_dir / "control.log"
    write(control, "Starting control daemon using socket /tmp/x/control", tag="Control", pid=452, offset=-60)
    d = str(log_dir)
    args = ["--log-dir", d, "--pipe-dir", str(tmp_path / "no-pipe"), "--mps-control-bin", FAKE_CONTROL]
    with Agent(args, env=LOGS_ENV) as agent:
        started = key("mps_log_last_event_timestamp_seconds", log_dir=d, event="control_started")
        s = agent.wait_for(lambda s: s if started in s else None)
        # read back at start: known (its time), but not counted again after an agent restart
        assert abs(s[started] - (time.time() - 60)) < 5
        assert s[key("mps_log_events_total", log_dir=d, source="control", event="control_started")] == 0
        assert s[key("mps_log_events_total", log_dir=d, source="control", event="server_exited")] == 0
        # no server.log yet: its counters are there at 0, so the first event is an increase
        assert s[key("mps_log_events_total", log_dir=d, source="server", event="fatal_gpu_error")] == 0

        write(server, "Client {PID: 729, Context ID: 0} connected", "Client {PID: 729, Context ID: 1} connected",
              "Client {PID: 729, Context: 1} encountered a fatal GPU error.", "Server is handling a fatal GPU error.",
              "Client {PID: 729, Context ID: 1} on device 0 to be torn down")
        written_at = time.monotonic()
        fatal = key("mps_log_events_total", log_dir=d, source="server", event="fatal_gpu_error")
        s = agent.wait_for(lambda s: s if s.get(fatal) == 1 else None, timeout=4 * INTERVAL + 2)
        assert time.monotonic() - written_at <= 2 * INTERVAL + 1.0
        assert s[key("mps_log_events_total", log_dir=d, source="server", event="client_connected")] == 1
        assert s[key("mps_log_events_total", log_dir=d, source="server", event="client_torn_down")] == 1
        assert abs(s[key("mps_log_last_event_timestamp_seconds", log_dir=d, event="fatal_gpu_error")] - time.time()) < 5

        os.rename(server, log_dir / "server.log.1")  # logrotate: rename, then a new file
        write(server, "Server teardown in progress. Refusing to accept new client {PID: 752, Context ID: 0}")
        refused = key("mps_log_events_total", log_dir=d, source="server", event="new_client_refused")
        s = agent.wait_for(lambda s: s if s.get(refused) == 1 else None, timeout=4 * INTERVAL + 2)
        assert s[key("mps_log_file_resets_total", log_dir=d, source="server", reason="rotated")] == 1
        assert s[fatal] == 1  # nothing read twice

        with open(server, "ab") as handle:
            handle.write(b"\xff\xfe not utf-8\n")
        undecodable = key("mps_log_read_errors_total", log_dir=d, source="server", reason="undecodable")
        agent.wait_for(lambda s: s.get(undecodable) == 1, timeout=4 * INTERVAL + 2)
        assert agent.get("/healthz")[0] == 200


def test_status_explains_a_fault_with_the_logged_fatal_error_and_lists_recent_events(fake_daemon, tmp_path):
    daemon = fake_daemon("server_fault_driver580")  # server 632 in FAULT
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    write(log_dir / "server.log",
          "Client {PID: 513, Context: 1} encountered a fatal GPU error.",
          "Server is handling a fatal GPU error.",
          pid=632, offset=-30)
    run = subprocess.run(
        mpswatch_cmd("status", "--json", "--pipe-dir", daemon.path, "--log-dir", str(log_dir),
                     "--mps-control-bin", FAKE_CONTROL),
        env=agent_env(), capture_output=True, text=True, timeout=60,
    )
    report = json.loads(run.stdout)
    [server] = report["daemons"][0]["servers"]
    assert server["fault_cause"]["client_pid"] == 513 and 25 < server["fault_cause"]["age_seconds"] < 60
    assert "FAULT: MPS blames client 513 for a fatal GPU error " in server["reason"]
    assert report["recent_events"][0]["event"] == "fatal_gpu_error"
    text = subprocess.run(
        mpswatch_cmd("status", "--pipe-dir", daemon.path, "--log-dir", str(log_dir), "--mps-control-bin", FAKE_CONTROL),
        env=agent_env(), capture_output=True, text=True, timeout=60,
    ).stdout
    assert any(line.startswith("EVENT") and "fatal_gpu_error: client 513, server 632" in line for line in text.splitlines())


def test_the_fault_cause_survives_a_flood_of_refusals(tmp_path):
    from mpswatch.collectors.mps_logs import MpsLogsCollector
    from mpswatch.procfs import ProcFS

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    collector = MpsLogsCollector(log_dirs=(str(log_dir),), procfs=ProcFS(tmp_path / "proc"))
    collector.collect()
    write(log_dir / "server.log", "Client {PID: 729, Context: 1} encountered a fatal GPU error.")
    write(log_dir / "server.log", *["Server teardown in progress. Refusing to accept new client {PID: 9, Context ID: 0}"] * 80)
    data = collector.collect()
    assert data.fatal_errors[486][1].client_pid == 729
    assert len(data.recent) == 50


def test_a_line_dated_far_ahead_does_not_pin_the_last_event_time(tmp_path):
    from mpswatch.collectors.mps_logs import MpsLogsCollector
    from mpswatch.procfs import ProcFS

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    collector = MpsLogsCollector(log_dirs=(str(log_dir),), procfs=ProcFS(tmp_path / "proc"))
    collector.collect()
    write(log_dir / "server.log", "Client process 5 disconnected", offset=10 * 365 * 86400)
    write(log_dir / "server.log", "Client process 6 disconnected")
    [state] = collector.collect().dirs
    assert abs(state.last_event_time["client_disconnected"] - time.time()) < 5
    assert state.event_counts[("server", "client_disconnected")] == 2


def test_an_invalid_byte_inside_a_fatal_error_or_refusal_line_keeps_the_event(tmp_path):
    from mpswatch.collectors.mps_logs import MpsLogsCollector
    from mpswatch.procfs import ProcFS

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    collector = MpsLogsCollector(log_dirs=(str(log_dir),), procfs=ProcFS(tmp_path / "proc"))
    collector.collect()
    with open(log_dir / "server.log", "ab") as handle:
        handle.write(f"[{stamp()} Server   486] Client {{PID: 729, Context: 1}} encountered a fatal GPU error.\xff\n"
                     .encode().replace(b"\xc3\xbf", b"\xff"))
        handle.write(f"[{stamp()} Server   486] Server teardown in progress.\xfe Refusing to accept new client "
                     f"{{PID: 752, Context ID: 0}}\n".encode().replace(b"\xc3\xbe", b"\xfe"))
    data = collector.collect()
    [state] = data.dirs
    assert state.event_counts[("server", "fatal_gpu_error")] == 1
    assert state.event_counts[("server", "new_client_refused")] == 1
    assert data.fatal_errors[486][1].client_pid == 729
    assert state.read_problems[("server", "undecodable")] == 2


def test_logs_renamed_every_150_lines_between_two_reads_lose_no_refusal(tmp_path):
    # issue 17 finding 6: a writer rotating faster than the agent reads lost all 24 refusals and the
    # fatal error, and counted 1 rotation of 13
    from mpswatch.collectors.mps_logs import MpsLogsCollector
    from mpswatch.procfs import ProcFS

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    server = log_dir / "server.log"
    write(server, "Client process 1 disconnected")
    collector = MpsLogsCollector(log_dirs=(str(log_dir),), procfs=ProcFS(tmp_path / "proc"))
    collector.collect()
    written, rotations = 1, 0
    for i in range(1999):
        if written % 150 == 0:  # logrotate's numbered rename, then a new file
            for number in range(rotations, 0, -1):
                os.rename(log_dir / f"server.log.{number}", log_dir / f"server.log.{number + 1}")
            os.rename(server, log_dir / "server.log.1")
            rotations += 1
        if i == 1000:
            write(server, "Client {PID: 729, Context: 1} encountered a fatal GPU error.")
        elif i % 80 == 40:
            write(server, f"Server teardown in progress. Refusing to accept new client {{PID: {i}, Context ID: 0}}")
        else:
            write(server, f"Client process {i} disconnected")
        written += 1
    assert rotations == 13
    [state] = collector.collect().dirs
    assert state.event_counts[("server", "new_client_refused")] == 24
    assert state.event_counts[("server", "fatal_gpu_error")] == 1
    assert state.event_counts[("server", "client_disconnected")] == 1999 - 25
    assert state.file_resets[("server", "rotated")] == 13
    assert state.read_problems[("server", "rotation_lost")] == 0


def test_accept_failures_are_counted_and_notable_only_when_more_than_a_burst_explains(tmp_path):
    # issue 17 finding 13: five in a burst of 50 clients were listed among status's notable events
    from mpswatch.collectors.mps_logs import ACCEPT_FAILED_REPEATS, MpsLogsCollector
    from mpswatch.procfs import ProcFS

    log_dir = tmp_path / "log"
    log_dir.mkdir()
    control = log_dir / "control.log"
    collector = MpsLogsCollector(log_dirs=(str(log_dir),), procfs=ProcFS(tmp_path / "proc"))
    collector.collect()
    write(control, *["Accepting connection...", "Unable to accept connection"] * 5, tag="Control", pid=452, offset=-300)
    data = collector.collect()
    [state] = data.dirs
    assert state.event_counts[("control", "accept_failed")] == 5
    assert state.event_counts[("control", "unrecognised_error")] == 0
    assert data.recent == ()
    # twice as many as the burst within a minute: one notable entry saying how many
    write(control, *["Unable to accept connection"] * (2 * ACCEPT_FAILED_REPEATS), tag="Control", pid=452)
    data = collector.collect()
    assert data.dirs[0].event_counts[("control", "accept_failed")] == 5 + 2 * ACCEPT_FAILED_REPEATS
    [(_, noted)] = data.recent
    assert noted.event == "accept_failed" and noted.detail == f"{ACCEPT_FAILED_REPEATS} in 0 s"


def test_status_lists_no_notable_event_for_the_accept_failures_of_a_burst_of_clients(tmp_path):
    # issue 17 finding 13: the five "Unable to accept connection" lines of a 50-client burst on the
    # H200 were listed among status's notable events as unrecognised errors
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    fixture = Path(__file__).parent / "fixtures" / "mps-log-shapes" / "accept-failed-in-a-50-client-burst-h200-driver580-control.log"
    shutil.copyfile(fixture, log_dir / "control.log")
    run = subprocess.run(
        mpswatch_cmd("status", "--json", "--pipe-dir", str(tmp_path / "no-pipe"), "--log-dir", str(log_dir),
                     "--mps-control-bin", FAKE_CONTROL),
        env=agent_env(), capture_output=True, text=True, timeout=60,
    )
    report = json.loads(run.stdout)
    assert report["log_dirs"][0]["files"] == ["control.log"]
    assert [e["event"] for e in report["recent_events"]] == []
