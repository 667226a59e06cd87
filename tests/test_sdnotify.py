"""systemd's watchdog: READY=1 once serving, WATCHDOG=1 only while the collection loops are alive
(what /healthz answers), STOPPING=1 on the way out; over $NOTIFY_SOCKET, as systemd reads it."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from mpswatch.sdnotify import Notifier, keep_watchdog_fed

from tests.kit.agentproc import Agent
from tests.kit.fakedaemon import FAKE_CONTROL


@pytest.fixture
def manager(tmp_path):
    """A service manager's notification socket: a bound unix datagram socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    yield sock, path
    sock.close()


def received(sock: socket.socket, timeout: float) -> list[str]:
    """Every datagram that arrives within `timeout` seconds of the last one (or of the call)."""
    messages = []
    sock.settimeout(timeout)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except TimeoutError:
        return messages


def queued(sock: socket.socket) -> list[str]:
    """The datagrams waiting now."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.setblocking(True)


def wait_for_message(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted} within {timeout} s; got {seen}"
        sock.settimeout(left)
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return seen


def test_notifications_reach_a_path_and_an_abstract_socket(manager):
    sock, path = manager
    assert Notifier({"NOTIFY_SOCKET": path}).notify("READY=1")
    assert sock.recv(4096) == b"READY=1"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mpswatch-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract.bind("\0" + name)
    with abstract:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
        assert abstract.recv(4096) == b"WATCHDOG=1"


class Recorder:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_without_a_usable_socket_nothing_is_sent(value):
    notifier = Notifier({"NOTIFY_SOCKET": value} if value else {})
    assert not notifier.enabled and not notifier.notify("READY=1")


def test_a_socket_that_is_gone_costs_a_logged_line_not_the_agent(tmp_path):
    log = Recorder()
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}, log=log)
    assert notifier.notify("READY=1") is False
    assert notifier.notify("WATCHDOG=1") is False
    assert [event for event, _ in log.events] == ["sd_notify_failed"]  # once per kind of error


@pytest.mark.parametrize("environ,seconds", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "３０"}, None),  # not ASCII digits
    ({"WATCHDOG_USEC": "-5"}, None),
    ({}, None),
])
def test_the_watchdog_timeout_comes_from_systemds_variables(environ, seconds):
    assert Notifier(environ).watchdog_seconds == seconds


def test_the_watchdog_is_fed_only_while_the_loops_are_alive(manager):
    """Deterministic on a busy machine: it waits for the health checks themselves, not for time."""
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # a check every 0.05 s
    health = {"ok": True, "checks": 0}
    checked = threading.Condition()

    def healthy():
        with checked:
            health["checks"] += 1
            checked.notify_all()
            return health["ok"], "collection loop gpu silent for 20 s" if not health["ok"] else "ok"

    def checks_pass(count):
        with checked:
            target = health["checks"] + count
            assert checked.wait_for(lambda: health["checks"] >= target, timeout=30)

    stop = threading.Event()
    thread = threading.Thread(target=keep_watchdog_fed, args=(notifier, healthy, stop))
    thread.start()
    try:
        checks_pass(3)  # each ping goes out before the next check
        pings = queued(sock)
        assert len(pings) >= 2 and set(pings) == {"WATCHDOG=1"}
        health["ok"] = False
        checks_pass(2)  # a ping under way when health turned is out by the second check
        queued(sock)
        checks_pass(5)
        assert queued(sock) == []
        health["ok"] = True
        checks_pass(2)
        assert "WATCHDOG=1" in queued(sock)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_health_check_that_raises_withholds_the_ping_and_keeps_the_thread(manager):
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    calls = []
    answered = threading.Event()

    def healthy():
        calls.append(1)
        if len(calls) >= 5:
            answered.set()
            return True, "ok"
        raise RuntimeError("broken check")

    stop = threading.Event()
    thread = threading.Thread(target=keep_watchdog_fed, args=(notifier, healthy, stop))
    thread.start()
    try:
        assert answered.wait(30)
        assert wait_for_message(sock, "WATCHDOG=1", timeout=30) == ["WATCHDOG=1"]  # none while it raised
    finally:
        stop.set()
        thread.join(timeout=30)


def test_the_agent_tells_systemd_it_is_ready_alive_and_stopping(manager, tmp_path):
    sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    agent = Agent(["--mps-control-bin", FAKE_CONTROL], env=env, log_path=tmp_path / "agent.log", nvml="no_driver")
    try:
        first = wait_for_message(sock, "READY=1", timeout=30)
        assert first[-1] == "READY=1" and "WATCHDOG=1" not in first  # ready before any ping
        wait_for_message(sock, "WATCHDOG=1", timeout=30)
    finally:
        assert agent.stop() == 0
    assert "STOPPING=1" in received(sock, 5)
