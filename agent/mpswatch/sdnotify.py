"""systemd's service notifications (sd_notify) over a plain unix datagram socket, no dependency.

Under `Type=notify` with `WatchdogSec=` (deploy/systemd/mpswatch.service) the agent says READY=1 once
it serves, then WATCHDOG=1 while its collection loops are alive, the same check /healthz answers:
a wedged agent stops pinging and systemd restarts it. Outside systemd ($NOTIFY_SOCKET unset) every
call does nothing.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import structlog


def _address(value: str) -> str | None:
    """$NOTIFY_SOCKET as a socket address: a path, or @name for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT) and anything else: not for a service on the host


class Notifier:
    """Sends notifications to the service manager named by $NOTIFY_SOCKET; a failure is logged once
    per kind of error and never raised: a lost notification must not take the agent down."""

    def __init__(self, environ: Mapping[str, str] | None = None, log: Any = None) -> None:
        environ = os.environ if environ is None else environ
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._log = log or structlog.get_logger().bind(component="sd_notify")
        self._failed: set[str] = set()
        self.watchdog_seconds = self._watchdog(environ)

    @staticmethod
    def _watchdog(environ: Mapping[str, str]) -> float | None:
        """The watchdog timeout systemd set for this process, in seconds (None: no watchdog)."""
        pid = environ.get("WATCHDOG_PID")
        if pid is not None and pid != str(os.getpid()):
            return None  # meant for another process (e.g. a shell that exec'd us is not us)
        usec = environ.get("WATCHDOG_USEC", "")
        if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
            return None
        return int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Sends `state` (e.g. "READY=1"); True when it went out."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode())
            return True
        except OSError as err:
            kind = type(err).__name__
            if kind not in self._failed:
                self._failed.add(kind)
                self._log.warning("sd_notify_failed", state=state.split("=", 1)[0], error=str(err))
            return False


def keep_watchdog_fed(notifier: Notifier, healthy: Callable[[], tuple[bool, str]], stop: threading.Event) -> None:
    """Until `stop`: WATCHDOG=1 every half timeout (as sd_watchdog_enabled(3) advises) while
    `healthy()` says so; while it does not, nothing is sent, so systemd restarts the agent once the
    timeout passes. Runs on a thread of its own."""
    if notifier.watchdog_seconds is None:
        return
    log = structlog.get_logger().bind(component="sd_notify")
    was_healthy = True
    while not stop.wait(notifier.watchdog_seconds / 2):
        try:
            ok, detail = healthy()
        except Exception as err:  # a check that cannot answer is no sign of life
            ok, detail = False, f"health check failed: {err!r}"
        if ok:
            notifier.notify("WATCHDOG=1")
        elif was_healthy:
            log.error("watchdog_withheld", reason=detail)
        was_healthy = ok


def start(healthy: Callable[[], tuple[bool, str]], stop: threading.Event, notifier: Notifier | None = None) -> Notifier:
    """READY=1 now, and the watchdog on a daemon thread when systemd asked for one."""
    notifier = notifier or Notifier()
    if notifier.enabled:
        notifier.notify("READY=1")
        if notifier.watchdog_seconds is not None:
            threading.Thread(target=keep_watchdog_fed, args=(notifier, healthy, stop), name="sd-watchdog",
                             daemon=True).start()
    return notifier
