"""The MPS log parser on every line shape of real H200 logs (driver 580) and older wordings."""

from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpswatch.collectors.mps_logs import (
    KINDS,
    MAX_SERVER_STARTS_KEPT,
    LineContext,
    parse_line,
    read_line,
    server_starts_after,
)

FIXTURES = Path(__file__).parent / "fixtures" / "h200-driver580"
PLUGIN = Path(__file__).parent / "fixtures" / "device-plugin-mps"


def parse_file(name: str, source: str, where: Path = FIXTURES):
    context, events = LineContext(), []
    for line in (where / name).read_text().splitlines():
        event, context = parse_line(line, source, context)
        if event:
            events.append(event)
    return events


def one(line: str, source: str = "server", context: LineContext | None = None):
    return parse_line(line, source, context or LineContext())[0]


S = "[2026-11-29 19:23:50.747 Server   486] "
C = "[2026-11-29 18:42:22.059 Control   422] "


@pytest.mark.parametrize(
    "message,event,client_pid,server_pid,detail",
    [
        ("Client {PID: 437, Context ID: 0} connected", "client_connected", 437, 486, None),
        ("Client process 437 disconnected", "client_disconnected", 437, 486, None),
        ("Client {PID: 729, Context: 1} encountered a fatal GPU error.", "fatal_gpu_error", 729, 486, None),
        ("Server is handling a fatal GPU error.", "server_fault", None, 486, None),
        ("Client {PID: 735, Context ID: 1} on device 0 to be torn down", "client_torn_down", 735, 486, "device 0"),
        ("Server teardown in progress. Refusing to accept new client {PID: 752, Context ID: 0}",
         "new_client_refused", 752, 486, None),
        # older drivers (NVIDIA's documentation)
        ("New client 14781 connected", "client_connected", 14781, 486, None),
        ("Client 14777 disconnected", "client_disconnected", 14777, 486, None),
        ("Volta MPS: Server is handling a fatal GPU error.", "server_fault", None, 486, None),
        ("Volta MPS: status of client {11641, 1} is INACTIVE", "client_torn_down", 11641, 486, None),
        ("MPS server failed to start", "server_start_failed", None, 486, None),
    ],
)
def test_server_log_lines_become_events(message, event, client_pid, server_pid, detail):
    parsed = one(S + message)
    assert (parsed.event, parsed.client_pid, parsed.server_pid, parsed.detail) == (event, client_pid, server_pid, detail)
    assert parsed.source == "server"


@pytest.mark.parametrize(
    "message,event,server_pid,detail",
    [
        ("Starting control daemon using socket /tmp/mp/control", "control_started", None, None),
        ("Starting new server 440 for user 0", "server_started", 440, "uid 0"),
        ("Server 440 exited with status 0", "server_exited", 440, "status 0"),
        ("Server 95 exited with status 1", "server_died", 95, "status 1"),
        ("Server 96 exited with status -9", "server_died", 96, "status -9"),
        ("Server encountered a fatal exception. Shutting down", "server_fatal_exception", None, None),
        ("Exit with status 0", "control_exited", None, "status 0"),
    ],
)
def test_control_log_lines_become_events(message, event, server_pid, detail):
    parsed = one(C + message, "control")
    assert (parsed.event, parsed.server_pid, parsed.detail) == (event, server_pid, detail)


@pytest.mark.parametrize(
    "command",
    ["set_default_active_thread_percentage 50", "set_default_device_pinned_mem_limit 0 71885M",
     "set_default_device_pinned_mem_limit GPU-2ea0ea17 35G"],
)
def test_a_command_setting_a_default_limit_is_a_limits_set_event_naming_it(command):
    context = LineContext()
    events = []
    for message in ("Accepting connection...", "NEW UI", f"Cmd:{command}", "50.0", "UI closed"):
        event, context = parse_line(C + message, "control", context)
        events.append(event and (event.event, event.server_pid, event.detail))
    assert events == [None, None, ("limits_set", None, command), None, None]


@pytest.mark.parametrize(
    "message",
    ["Cmd:get_default_active_thread_percentage", "Cmd:set_active_thread_percentage 476 25",
     "Cmd:set_default_client_priority 1", "Cmd:set_default_active_thread_percentage"],
)
def test_queries_per_server_settings_and_priorities_are_not_limits_set(message):
    assert one(C + message, "control") is None


def test_the_device_plugins_control_log_gives_its_limits_after_the_server_a_client_started():
    events = parse_file("limits-race-control.log", "control", PLUGIN)
    assert [(e.event, e.server_pid, e.detail) for e in events] == [
        ("control_started", None, None),
        ("server_started", 2215, "uid 0"),
        ("limits_set", None, "set_default_device_pinned_mem_limit 0 71885M"),
        ("limits_set", None, "set_default_active_thread_percentage 50"),
    ]


def replay(events, starts=None):
    starts = {} if starts is None else starts
    for event in events:
        starts = server_starts_after(starts, "/run/nvidia/mps/nvidia.com/gpu/log", event)
    return starts


def test_a_server_started_before_the_daemons_limits_were_set_is_marked_with_the_last_of_them():
    starts = replay(parse_file("limits-race-control.log", "control", PLUGIN))
    assert list(starts) == [2215]
    assert starts[2215].before_limits
    assert starts[2215].limits_after.detail == "set_default_active_thread_percentage 50"
    assert starts[2215].log_dir == "/run/nvidia/mps/nvidia.com/gpu/log"


def test_a_server_started_after_the_limits_were_set_runs_with_them():
    later = one("[2026-12-02 09:20:00.000 Control  2500] Starting new server 2500 for user 1000", "control")
    starts = replay([later], replay(parse_file("limits-race-control.log", "control", PLUGIN)))
    assert (starts[2215].before_limits, starts[2500].before_limits) == (True, False)


def test_a_daemon_restart_forgets_the_servers_of_the_daemon_before():
    # session 1's daemon starts server 476 and quits; session 2's daemon starts afresh
    events = parse_file("session1-control.log", "control")[:2] + parse_file("session2-fault-control.log", "control")[:2]
    assert list(replay(events)) == [440]


def test_a_server_that_exited_is_forgotten_and_server_log_events_change_nothing():
    starts = replay(parse_file("session1-control.log", "control"))
    assert starts == {}
    running = replay(parse_file("session1-control.log", "control")[:2])
    assert replay(parse_file("session1-server.log", "server"), running) == running


def test_at_most_a_bounded_number_of_server_starts_is_kept_the_latest():
    events = [one(f"{C[:-1].replace('422', str(pid))} Starting new server {pid} for user 0", "control")
              for pid in range(1, MAX_SERVER_STARTS_KEPT + 11)]
    starts = replay(events)
    assert len(starts) == MAX_SERVER_STARTS_KEPT and min(starts) == 11


def test_a_client_refused_at_the_limit_is_the_one_that_connected_just_before():
    context = LineContext()
    _, context = parse_line(S + "Client {PID: 530, Context ID: 1} connected", "server", context)
    event, _ = parse_line(S + "Failed to accept new client. Maximum number of clients (48) reached.", "server", context)
    assert (event.event, event.client_pid, event.detail) == ("client_rejected_max_clients", 530, "limit 48")


def test_each_device_listed_for_reset_is_an_event_and_sticky_pids_are_not():
    context = LineContext()
    events = []
    for message in ["The following devices will be reset:", "0", "1",
                    "The following client process have a sticky error set:", "729", "735",
                    "Server failed to recevie command with status 806, assuming client {PID: 729, Context ID: 1} exit"]:
        event, context = parse_line(S + message, "server", context)
        events.append(event and (event.event, event.detail))
    assert events == [None, ("device_reset", "device 0"), ("device_reset", "device 1"), None, None, None, None]


@pytest.mark.parametrize(
    "message",
    [
        "Accepting connection...", "NEW UI", "UI closed", "User did not send valid credentials",
        "NEW CLIENT 437 from user 0: Server is not ready, push client to pending list",
        "NEW SERVER 476: Ready", "Client {PID: 437, Context ID: 1} connected",
        "Failed to accept client {PID: 530, Context ID: 0} with status 807",
        "Server failed to recevie command with status 806, assuming client {PID: 437, Context ID: 1} exit",
        "Client {PID: 437, Context ID: 1} exiting. Number of active client contexts is 1.",
        "All clients belonging to error trigging process 729 will be torn down",
        "Client {PID: 729, Context ID: 1} on the error-trigging process 729 to be torn down",
        "Destroy server context on device 0 (NVIDIA H200)", "Creating server context on device 0 (NVIDIA H200)",
        "Received device query command. There are 1 devices", "Server has started",
    ],
)
def test_routine_lines_are_not_events(message):
    assert one(S + message) is None


def test_command_echoes_are_not_events_even_when_they_look_like_errors():
    context = LineContext()
    lines = ["Accepting connection...", "NEW UI", "Cmd:get_server_status 1", "Server 1 not found", "UI closed",
             "Cmd:help", 'Unknown command "help"', "Invalid command format.", "UI closed"]
    events = []
    for message in lines:
        event, context = parse_line(C + message, "control", context)
        events.append(event)
    assert events == [None] * len(lines)


def test_an_error_like_line_that_matches_nothing_is_unrecognised():
    parsed = one(S + "Failed to map shared memory segment: out of cheese")
    assert parsed.event == "unrecognised_error" and "out of cheese" in parsed.message


def test_a_line_without_the_prefix_is_a_continuation_not_an_event():
    assert one("Server 440") is None and one("") is None


def test_time_comes_from_the_line_in_local_time():
    parsed = one("[2026-11-29 19:23:50.747 Server   486] Server is handling a fatal GPU error.")
    expected = time.mktime(datetime(2026, 11, 29, 19, 23, 50).timetuple()) + 0.747
    assert parsed.time == pytest.approx(expected)


@pytest.mark.parametrize(
    "name,source,expected",
    [
        ("session1-server.log", "server", {"client_connected": 2, "client_disconnected": 2}),
        ("session1-control.log", "control", {"control_started": 1, "server_started": 1, "server_exited": 1,
                                             "control_exited": 1}),
        ("session2-fault-server.log", "server", {"client_connected": 3, "client_disconnected": 3, "fatal_gpu_error": 1,
                                                 "server_fault": 1, "client_torn_down": 2, "device_reset": 1,
                                                 "new_client_refused": 1}),
        ("session2-fault-control.log", "control", {"control_started": 1, "server_started": 1, "server_exited": 1,
                                                   "control_exited": 1}),
        ("session3-50-clients-then-fault-server.log", "server", {
            "client_connected": 53, "client_disconnected": 55, "client_rejected_max_clients": 2,
            "fatal_gpu_error": 1, "server_fault": 1, "client_torn_down": 2, "device_reset": 1,
            "new_client_refused": 1}),
    ],
)
def test_whole_real_logs_give_exactly_the_expected_events(name, source, expected):
    assert Counter(e.event for e in parse_file(name, source)) == expected


def test_the_real_fault_names_its_pids():
    events = {e.event: e for e in parse_file("session2-fault-server.log", "server")}
    assert events["fatal_gpu_error"].client_pid == 513 and events["fatal_gpu_error"].server_pid == 440
    assert events["new_client_refused"].client_pid == 530
    refused = [e.client_pid for e in parse_file("session3-50-clients-then-fault-server.log", "server")
               if e.event == "client_rejected_max_clients"]
    assert refused == [530, 531]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw):
    line = raw.decode("utf-8", "replace")
    for source in ("control", "server"):
        parse_line(line, source, LineContext())
        parse_line("[2026-11-29 19:23:50.747 Server   486] " + line, source, LineContext(listing="devices"))


@given(st.from_regex(r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} [A-Za-z ]{1,12} -?\d{1,25}\] .{0,80}", fullmatch=True))
def test_prefixed_lines_with_any_numbers_never_raise(line):
    parse_line(line, "server", LineContext())


def test_log_dirs_are_discovered_from_defaults_the_device_plugin_and_daemons(tmp_path):
    from mpswatch.collectors.mps_logs import discover_log_dirs
    from mpswatch.procfs import ProcFS

    default = tmp_path / "var-log-nvidia-mps"
    default.mkdir()
    plugin = tmp_path / "mps" / "nvidia.com" / "gpu" / "log"
    plugin.mkdir(parents=True)
    proc = tmp_path / "proc" / "501"
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"nvidia-cuda-mps-control\0-d\0")
    (proc / "environ").write_bytes(b"CUDA_MPS_LOG_DIRECTORY=/srv/mps/log\0")
    (proc / "status").write_text("Name:\tnvidia-cuda-mps\nUid:\t0\t0\t0\t0\n")  # root's daemon
    discovered = discover_log_dirs((), str(default), str(tmp_path / "mps"), ProcFS(tmp_path / "proc"))
    assert dict(discovered.dirs) == {str(default): "default", str(plugin): "device_plugin", "/srv/mps/log": "process"}
    assert discovered.notes == []
    assert discovered.owners == {"/srv/mps/log": frozenset({0})}  # its files are read when root's
    assert discover_log_dirs(("/only",), str(default), str(tmp_path / "mps"), ProcFS(tmp_path / "proc")).dirs == [
        ("/only", "configured")
    ]


@given(st.text(alphabet="0123456789", min_size=11, max_size=6000))
def test_huge_numbers_in_a_line_never_raise(number):
    for message in (f"Client process {number} disconnected", f"Server {number} exited with status {number}",
                    f"Client {{PID: {number}, Context ID: 0}} connected"):
        parse_line(f"[2026-11-29 19:23:50.747 Server   {number}] {message}", "server", LineContext())


def test_after_quit_and_a_restart_the_control_log_is_read_as_new():
    context = LineContext()
    for message in ("Accepting connection...", "NEW UI", "Cmd:quit", "Try shutting down server 440, backoff is disabled",
                    "Server 440 exited with status 0", "Exit with status 0",
                    "Starting control daemon using socket /tmp/mp/control"):
        _, context = parse_line(C + message, "control", context)
    event, _ = parse_line(C + "Unable to read new connection type information", "control", context)
    assert event is not None and event.event == "unrecognised_error"


def test_a_zone_can_be_given_for_daemons_that_log_in_another_one():

    event = one("[2026-11-29 19:23:50.000 Server   486] Server is handling a fatal GPU error.",
                context=LineContext())
    utc = parse_line("[2026-11-29 19:23:50.000 Server   486] Server is handling a fatal GPU error.", "server",
                     LineContext(), UTC)[0]
    assert utc.time == datetime(2026, 11, 29, 19, 23, 50, tzinfo=UTC).timestamp()
    assert event.time == time.mktime(datetime(2026, 11, 29, 19, 23, 50).timetuple())


SHAPES = Path(__file__).parent / "fixtures" / "mps-log-shapes"
MATRIX = Path(__file__).parent / "fixtures" / "h200-matrix"


def real_log_texts():
    """(where, source, lines) for every log recorded on the H200: the sessions, the device plugin's
    control log, and the tails of the logs the fault matrix's recordings keep in their notes."""
    for path in sorted([*FIXTURES.glob("*.log"), *PLUGIN.glob("*.log"), *SHAPES.glob("*.log")]):
        yield path.name, "control" if "control" in path.name else "server", path.read_text().splitlines()
    for path in sorted(MATRIX.glob("*.json.gz")):
        for number, case in enumerate(json.loads(gzip.decompress(path.read_bytes()))["cases"]):
            for note in case["notes"]:
                if not re.search(r"^\[\d{4}-", note, re.M):
                    continue
                lines = note.splitlines()[1:]  # a tail: its first line is cut
                source = "control" if any("Control" in line for line in lines[:5]) else "server"
                if source == "control":  # a tail can start inside a reply: read from the next connection
                    start = next((i for i, line in enumerate(lines) if line.endswith("Accepting connection...")), 0)
                    lines = lines[start:]
                yield f"{path.name} case {number}", source, lines


def test_every_line_of_the_real_h200_logs_is_known_for_what_it_is():
    # issue 17 finding 13: MPS's own lines must not be counted as unrecognised errors
    unknown, kinds, lines_read = [], Counter(), 0
    for where, source, lines in real_log_texts():
        context = LineContext()
        for line in lines:
            reading, context = read_line(line, source, context)
            kinds[reading.kind] += 1
            lines_read += 1
            if reading.kind == "unrecognised":
                unknown.append(f"{where}: {line}")
    assert unknown == []
    assert lines_read > 1800 and set(kinds) >= set(KINDS) - {"unrecognised"}


def test_a_connection_the_control_daemon_could_not_accept_is_accept_failed_not_an_error():
    events = Counter(e.event for e in parse_file("accept-failed-in-a-50-client-burst-h200-driver580-control.log",
                                                 "control", SHAPES))
    assert events["accept_failed"] == 5
    assert events["unrecognised_error"] == 0
    reading, _ = read_line(C + "Unable to accept connection: Resource temporarily unavailable", "control")
    assert reading.kind == "transient" and reading.event is not None and reading.event.event == "accept_failed"
