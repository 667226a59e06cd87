"""MPS log collector: events from control.log and server.log that the control commands never tell.

The parser is pure: a line and the file's small context in, an event (or none) and the next
context out. Patterns come from real H200 logs (driver 580, tests/fixtures), the older wordings
NVIDIA documents and, for the commands that set a daemon's default limits, the Kubernetes device
plugin's daemon log. Each line gets a kind (KINDS), and every line of the real captures is known;
error-like lines that match nothing count as `unrecognised_error`.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import structlog

from mpswatch.collectors import CollectorUnit
from mpswatch.collectors.mps_control import DirsFound, configured_dirs, discover_mps_dirs
from mpswatch.logfollow import LogFollower
from mpswatch.metrics import Families
from mpswatch.procfs import ProcFS
from mpswatch.snapshot import DerivedFacts, LogDirState, LogEvent, MpsLogsData, ServerStart, frozen_map
from mpswatch.verdicts import RECENT_EVENTS_SHOWN, StatusSection, event_entry

SOURCES = {"control": "control.log", "server": "server.log"}
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"

EVENTS = (
    "server_started",
    "server_exited",
    "server_died",
    "server_start_failed",
    "server_fault",
    "server_fatal_exception",
    "client_connected",
    "client_disconnected",
    "client_rejected_max_clients",
    "fatal_gpu_error",
    "client_torn_down",
    "new_client_refused",
    "device_reset",
    "control_started",
    "control_exited",
    "limits_set",
    "accept_failed",
    "unrecognised_error",
)
# what `status` lists: what a person on call must know about
NOTABLE = frozenset(
    {
        "server_exited",
        "server_died",
        "server_start_failed",
        "server_fatal_exception",
        "client_rejected_max_clients",
        "fatal_gpu_error",
        "new_client_refused",
        "device_reset",
        "unrecognised_error",
    }
)

# numbers are bounded (PIDs, statuses, devices): Python refuses to convert thousands of digits
_LINE = re.compile(
    r"^\[(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(\d{1,6}))?\s+([A-Za-z][A-Za-z ]*?)\s+(-?\d{1,10})\]\s?(.*)$"
)
_CLIENT = r"\{PID: (-?\d{1,10}), Context(?: ID)?: (\d{1,10})\}"
_ERRORISH = re.compile(r"fail|error|fatal|unable|cannot|can't|refus|invalid|exception|abort|denied|timed? ?out", re.I)


@dataclass(frozen=True)
class LineContext:
    """What a line means can depend on the lines before it, within one file."""

    # control.log echoes each command's reply between `Cmd:` and `UI closed`; other threads' lines
    # (a server exiting after `quit`, a server starting) can land in between and still count
    in_reply: bool = False
    listing: str | None = None  # "devices" or "sticky" after their header line
    last_connected_pid: int | None = None  # the refusal line does not name the refused client


# what each line of the logs is, so that every line seen on real hardware is known for what it is
KINDS = (
    "informational",  # banners, versions, settings a server starts with, devices it sees
    "command",  # a control command's echo (`Cmd:`), its reply, the UI session around it
    "client_lifecycle",  # clients connecting, their contexts, their exit
    "server_lifecycle",  # the control daemon and servers starting, shutting down, exiting
    "refusal",  # a client turned away: at the client limit, during a teardown
    "fatal",  # a fatal GPU error, the teardown and device reset it brings
    "transient",  # MPS's own hiccups that it recovers from by itself (a connection it could not accept)
    "unrecognised",  # none of the above: an error-like one is the `unrecognised_error` event
)


@dataclass(frozen=True)
class LineReading:
    kind: str  # one of KINDS
    event: LogEvent | None = None


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    event: str | None  # None: known and routine, not an event
    kind: str
    build: Callable[[re.Match[str], int], dict[str, Any]] = lambda m, pid: {}


def _rule(
    regex: str, event: str | None, kind: str, build: Callable[[re.Match[str], int], dict[str, Any]] | None = None
) -> _Rule:
    return _Rule(re.compile(regex), event, kind, build or (lambda m, pid: {}))


_RULES = [
    # control.log
    _rule(r"^Starting new server (\d{1,10}) for user (\d{1,10})", "server_started", "server_lifecycle",
          lambda m, pid: {"server_pid": int(m[1]), "detail": f"uid {m[2]}"}),
    # status 0 is a server let go (quit, or idle); anything else killed its clients with it
    _rule(r"^Server (\d{1,10}) exited with status (0)\b", "server_exited", "server_lifecycle",
          lambda m, pid: {"server_pid": int(m[1]), "detail": f"status {m[2]}"}),
    _rule(r"^Server (\d{1,10}) exited with status (-?\d{1,10})", "server_died", "server_lifecycle",
          lambda m, pid: {"server_pid": int(m[1]), "detail": f"status {m[2]}"}),
    _rule(r"^Server encountered a fatal exception", "server_fatal_exception", "fatal"),
    _rule(r"^Starting control daemon", "control_started", "server_lifecycle"),
    _rule(r"^Exit with status (-?\d{1,10})", "control_exited", "server_lifecycle",
          lambda m, pid: {"detail": f"status {m[1]}"}),
    # a connection the control daemon could not accept: five in a burst of 50 clients on the H200
    # (issue 17), every client connected all the same
    _rule(r"^Unable to accept connection", "accept_failed", "transient"),
    # server.log, driver 580 wording, then the older wordings
    _rule(rf"^Client {_CLIENT} connected", "client_connected", "client_lifecycle",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(r"^New client (\d{1,10}) connected", "client_connected", "client_lifecycle",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(r"^Client (?:process )?(\d{1,10}) disconnected", "client_disconnected", "client_lifecycle",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(r"Maximum number of clients \((\d{1,10})\) reached", "client_rejected_max_clients", "refusal",
          lambda m, pid: {"server_pid": pid, "detail": f"limit {m[1]}"}),
    _rule(rf"^(?:Volta MPS: )?Client {_CLIENT} encountered a fatal GPU error", "fatal_gpu_error", "fatal",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(r"^(?:Volta MPS: )?Server is handling a fatal GPU error", "server_fault", "fatal",
          lambda m, pid: {"server_pid": pid}),
    _rule(rf"^Client {_CLIENT} on device (\d{{1,10}}) to be torn down", "client_torn_down", "fatal",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1]), "detail": f"device {m[3]}"}),
    _rule(r"^(?:Volta MPS: )?status of client \{(\d{1,10}), \d+\} is INACTIVE", "client_torn_down", "fatal",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(rf"Refusing to accept new client {_CLIENT}", "new_client_refused", "refusal",
          lambda m, pid: {"server_pid": pid, "client_pid": int(m[1])}),
    _rule(r"(?:^|MPS server )[Ff]ailed to start", "server_start_failed", "server_lifecycle",
          lambda m, pid: {"server_pid": pid}),
    # routine lines, some of which look like errors but only follow an event above
    _rule(rf"^Failed to accept client {_CLIENT} with status 807", None, "refusal"),  # after "Refusing to accept"
    _rule(r"^Server failed to rec\w+ command with status \d+, assuming client", None, "client_lifecycle"),  # sic
    _rule(r"error.trigging process", None, "fatal"),
    _rule(r"^(?:NEW UI|UI closed)", None, "command"),
    _rule(r"^(?:Accepting connection|User did not send valid credentials|NEW CLIENT|Received new client request"
          r"|Creating worker thread|Status of client|Client \{PID: -?\d+, Context(?: ID)?: \d+\} exiting)",
          None, "client_lifecycle"),
    _rule(r"^(?:Volta MPS: )?(?:Destroy|Creating) server context", None, "server_lifecycle"),
    _rule(r"^(?:NEW SERVER|Try shutting down server|quit command issued|Startup|Connecting to control daemon"
          r"|Initializing server process|Server has started|Server has been notified to shutdown"
          r"|Waiting for current clients|Exiting)", None, "server_lifecycle"),
    _rule(r"^(?:To connect CUDA applications|CUDA MPS Control binary version|Created (?:anonymous|named) shared memory"
          r" region|CUDA MPS Server for Linux|Display Driver version|Active Threads Percentage set to"
          r"|Server Priority set to|Device pinned memory limit|Device .* is associated|Received device query command)",
          None, "informational"),
]
# the commands that set the daemon's default limits for the servers it starts next, as control.log
# echoes each command it receives (`Cmd:<command line>`): wording from the device plugin's daemon log
# in k8s-device-plugin issue 679 (tests/fixtures/device-plugin-mps/README.md)
_LIMITS_SET = re.compile(
    r"^Cmd:\s*(set_default_(?:active_thread_percentage|device_pinned_mem_limit)(?:[ \t]+\S{1,40}){1,2})\s*$"
)
_CONNECTED = re.compile(rf"^Client {_CLIENT} connected")
_REPLY_OVER = re.compile(r"^(?:UI closed|Accepting connection|NEW UI|Starting control daemon|Exit with status)")
_DEVICES_HEADER = re.compile(r"The following devices will be reset")
_STICKY_HEADER = re.compile(r"The following client(?:s| process(?:es)?) ha(?:ve|s) a sticky error set")
_NUMBER = re.compile(r"^\s*(\d{1,10})\s*$")


def parse_time(stamp: str, fraction: str | None, zone: tzinfo | None = None) -> float:
    """MPS writes its local time without a zone: `zone` is the daemon's (None: the agent's own)."""
    moment = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    seconds = moment.replace(tzinfo=zone).timestamp() if zone else time.mktime(moment.timetuple())
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def parse_line(
    line: str, source: str, context: LineContext = LineContext(), zone: tzinfo | None = None
) -> tuple[LogEvent | None, LineContext]:
    reading, context = read_line(line, source, context, zone)
    return reading.event, context


def read_line(
    line: str, source: str, context: LineContext = LineContext(), zone: tzinfo | None = None
) -> tuple[LineReading, LineContext]:
    """What one line is (its kind) and the event it states, if any, with the context for the next."""
    match = _LINE.match(line)
    if not match:  # a continuation of a multi-line reply (device_query prints some)
        return LineReading("command" if context.in_reply else "unrecognised"), context
    stamp, fraction, _tag, pid_text, message = match.groups()
    pid = int(pid_text)
    message = message.strip()
    limits = _LIMITS_SET.match(message)
    if message.startswith("Cmd:"):
        context = replace(context, in_reply=True, listing=None)
        if limits is None:
            return LineReading("command"), context
    if _REPLY_OVER.match(message):  # `quit` has no `UI closed`; a restart starts afresh
        context = replace(context, in_reply=False)
    try:
        when = parse_time(stamp, fraction, zone)
    except (ValueError, OverflowError):
        return LineReading("unrecognised"), context

    def event(name: str, **fields: Any) -> LogEvent:
        return LogEvent(event=name, time=when, source=source, pid=pid, message=message[:300], **fields)

    if limits is not None:
        return LineReading("command", event("limits_set", detail=" ".join(limits[1].split()))), context

    number = _NUMBER.match(message)
    if number and context.listing == "devices":
        return LineReading("fatal", event("device_reset", server_pid=pid, detail=f"device {number[1]}")), context
    if number and context.listing == "sticky":
        return LineReading("fatal"), context
    if _DEVICES_HEADER.search(message):
        return LineReading("fatal"), replace(context, listing="devices")
    if _STICKY_HEADER.search(message):
        return LineReading("fatal"), replace(context, listing="sticky")
    context = replace(context, listing=None)
    connected = _CONNECTED.match(message)
    if connected:
        # each CUDA context of a client connects; the process itself is context 0
        context = replace(context, last_connected_pid=int(connected[1]))
        if connected[2] != "0":
            return LineReading("client_lifecycle"), context
    for rule in _RULES:
        found = rule.pattern.search(message)
        if not found:
            continue
        if rule.event is None:
            return LineReading(rule.kind), context
        fields = rule.build(found, pid)
        if rule.event == "client_rejected_max_clients" and context.last_connected_pid is not None:
            fields["client_pid"] = context.last_connected_pid
            context = replace(context, last_connected_pid=None)
        return LineReading(rule.kind, event(rule.event, **fields)), context
    if context.in_reply:  # replies such as "Server 1 not found" are not errors
        return LineReading("command"), context
    if _ERRORISH.search(message):
        return LineReading("unrecognised", event("unrecognised_error")), context
    return LineReading("unrecognised"), context


MAX_SERVER_STARTS_KEPT = 256  # per log dir


def server_starts_after(
    starts: Mapping[int, ServerStart], log_dir: str, event: LogEvent
) -> Mapping[int, ServerStart]:
    """The servers a control log recorded starting since its daemon last started, after one more
    event of that log: a daemon start forgets them all, a server start adds one, a server exit drops
    it, and a command setting the daemon's default limits marks every server started before it (MPS
    applies a default only to servers started after it was set). At most MAX_SERVER_STARTS_KEPT, the
    latest."""
    if event.source != "control":
        return starts
    if event.event == "control_started":
        return {}
    if event.event == "limits_set":
        return {pid: replace(start, limits_after=event) for pid, start in starts.items()}
    if event.event in ("server_started", "server_exited", "server_died"):
        kept = {pid: start for pid, start in starts.items() if pid != event.server_pid}
        if event.event == "server_started" and event.server_pid is not None:
            kept[event.server_pid] = ServerStart(log_dir, event)
            while len(kept) > MAX_SERVER_STARTS_KEPT:
                kept.pop(next(iter(kept)))
        return kept
    return starts


# ---------------------------------------------------------------- discovery


def discover_log_dirs(configured: tuple[str, ...], default_dir: str, device_plugin_root: str, procfs: ProcFS) -> DirsFound:
    if configured:
        return configured_dirs(configured)
    return discover_mps_dirs(
        defaults=(default_dir,),
        device_plugin_root=device_plugin_root,
        leaf="log",
        env_var="CUDA_MPS_LOG_DIRECTORY",
        env_default=DEFAULT_LOG_DIR,
        accept=Path.is_dir,
        procfs=procfs,
        hint="name its log dir with --log-dir",
    )


# ---------------------------------------------------------------- collector

MAX_FATAL_ERRORS_KEPT = 256
# a connection the control daemon could not accept is MPS's own hiccup: five in a burst of 50 clients on
# the H200, every client served. Notable only when it repeats more than a burst explains: this many
# within the window (log time), then at most once a window
ACCEPT_FAILED_REPEATS = 10
ACCEPT_FAILED_WINDOW_SECONDS = 60.0
FUTURE_SLACK_SECONDS = 86400.0  # a line dated further ahead than this does not move the last-event time


@dataclass
class _WatchedDir:
    log_dir: str
    found_by: str
    followers: dict[str, LogFollower]
    contexts: dict[str, tuple[int, LineContext]] = field(default_factory=dict)  # source -> (generation, context)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    last_time: dict[str, float] = field(default_factory=dict)
    server_starts: Mapping[int, ServerStart] = field(default_factory=dict)  # see server_starts_after
    refusals: dict[str, str | None] = field(default_factory=dict)  # source -> why its file is refused (logged once)
    accept_failures: deque[float] = field(default_factory=lambda: deque(maxlen=ACCEPT_FAILED_REPEATS))
    accept_failed_noted_at: float | None = None


class MpsLogsCollector:
    name = "mps_logs"

    def __init__(
        self,
        *,
        log_dirs: tuple[str, ...] = (),
        default_log_dir: str = DEFAULT_LOG_DIR,
        device_plugin_root: str = "/run/nvidia/mps",
        backfill_bytes: int = 1 << 20,
        interval_seconds: float = 2.0,
        procfs: ProcFS | None = None,
        zone: tzinfo | None = None,
        recent_events: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.deadline_seconds = max(5.0, interval_seconds * 2)
        self._configured = log_dirs
        self._default = default_log_dir
        self._plugin_root = device_plugin_root
        self._backfill = backfill_bytes
        self._procfs = procfs or ProcFS()
        self._zone = zone
        self._clock = clock
        self._dirs: dict[str, _WatchedDir] = {}
        self._refused: dict[str, str] = {}  # log dirs named by daemons not trusted, and why (logged once)
        self._recent: deque[tuple[str, LogEvent]] = deque(maxlen=recent_events)
        self._fatal: dict[int, tuple[str, LogEvent]] = {}
        self._log = structlog.get_logger().bind(collector=self.name)

    def collect(self) -> MpsLogsData:
        discovered = discover_log_dirs(self._configured, self._default, self._plugin_root, self._procfs)
        for log_dir, why in discovered.refused.items():
            if self._refused.get(log_dir) != why:
                self._log.warning("log_dir_refused", log_dir=log_dir, reason=why)
        self._refused = discovered.refused
        self._remember(dict(discovered.dirs), discovered.owners)
        states = tuple(self._read(watched) for _, watched in sorted(self._dirs.items()))
        starts: dict[int, ServerStart] = {}
        for watched in self._dirs.values():  # a PID reused by a later server: the later start
            for pid, start in watched.server_starts.items():
                if pid not in starts or start.started.time > starts[pid].started.time:
                    starts[pid] = start
        return MpsLogsData(
            dirs=states, recent=tuple(self._recent), fatal_errors=frozen_map(self._fatal),
            discovery_notes=tuple(discovered.notes), server_starts=frozen_map(starts),
        )

    def _remember(self, found: dict[str, str], owners: Mapping[str, frozenset[int]]) -> None:
        """Dirs found once stay followed while they exist; a removed one is forgotten. The files of a
        dir found only in daemons' environments are read only when owned by those daemons' users."""
        for log_dir, found_by in found.items():
            if log_dir not in self._dirs:
                self._log.info("log_dir_found", log_dir=log_dir, found_by=found_by)
                followers = {
                    source: LogFollower(os.path.join(log_dir, name), self._backfill, owners=owners.get(log_dir))
                    for source, name in SOURCES.items()
                }
                self._dirs[log_dir] = _WatchedDir(log_dir, found_by, followers)
        for log_dir, watched in list(self._dirs.items()):
            if log_dir not in found and watched.found_by != "configured" and not os.path.isdir(log_dir):
                self._log.info("log_dir_forgotten", log_dir=log_dir, reason="directory removed")
                for follower in watched.followers.values():
                    follower.close()
                del self._dirs[log_dir]

    def _read(self, watched: _WatchedDir) -> LogDirState:
        for source, follower in watched.followers.items():
            lines = follower.poll()
            if follower.refusal != watched.refusals.get(source):
                if follower.refusal is not None:
                    self._log.warning("log_file_refused", path=follower.path, reason=follower.refusal)
                watched.refusals[source] = follower.refusal
            generation, context = watched.contexts.get(source, (follower.generation, LineContext()))
            if generation != follower.generation:
                context = LineContext()  # a new or truncated file: no command reply or list is open
            backfilled = 0
            for line in lines:
                try:
                    event, context = parse_line(line, source, context, self._zone)
                except Exception as err:  # a parser bug must cost one line, not the cycle
                    follower.stats.problem("parse_error")
                    self._log.error("log_parse_failed", line=line[:200], error=repr(err))
                    continue
                if event is None:
                    continue
                if follower.backfilling:
                    backfilled += 1  # written before the agent started: known, but not counted again
                else:
                    key = (source, event.event)
                    watched.counts[key] = watched.counts.get(key, 0) + 1
                self._remember_event(watched, event, announce=not follower.backfilling)
            watched.contexts[source] = (follower.generation, context)
            if backfilled:
                self._log.info("log_backfilled", log_dir=watched.log_dir, source=source, events=backfilled)
        followers = watched.followers
        return LogDirState(
            log_dir=watched.log_dir,
            found_by=watched.found_by,
            sources_present=tuple(sorted(s for s, f in followers.items() if f.is_open)),
            event_counts=frozen_map(
                {(source, event): watched.counts.get((source, event), 0) for source in SOURCES for event in EVENTS}
            ),
            last_event_time=frozen_map(watched.last_time),
            read_problems=frozen_map({(s, r): n for s, f in followers.items() for r, n in f.stats.problems.items()}),
            file_resets=frozen_map({(s, r): n for s, f in followers.items() for r, n in f.stats.resets.items()}),
            lines=frozen_map({s: f.stats.lines for s, f in followers.items()}),
        )

    def _remember_event(self, watched: _WatchedDir, event: LogEvent, announce: bool) -> None:
        watched.server_starts = server_starts_after(watched.server_starts, watched.log_dir, event)
        if event.time <= self._clock() + FUTURE_SLACK_SECONDS:
            watched.last_time[event.event] = max(event.time, watched.last_time.get(event.event, 0.0))
        if event.event == "fatal_gpu_error" and event.server_pid is not None:
            self._fatal.pop(event.server_pid, None)
            self._fatal[event.server_pid] = (watched.log_dir, event)
            while len(self._fatal) > MAX_FATAL_ERRORS_KEPT:
                self._fatal.pop(next(iter(self._fatal)))
        if event.event == "accept_failed":
            event = self._repeated_accept_failures(watched, event) or event
        if event.event in NOTABLE or (event.event == "accept_failed" and event.detail is not None):
            self._recent.append((watched.log_dir, event))
            if announce and event.event != "unrecognised_error":
                self._log.warning("log_event", log_dir=watched.log_dir, **_event_context(event))


    def _repeated_accept_failures(self, watched: _WatchedDir, event: LogEvent) -> LogEvent | None:
        """The accept failure that makes ACCEPT_FAILED_REPEATS within the window, saying so in its
        detail; None while they are as few as a burst of clients explains."""
        times = watched.accept_failures
        times.append(event.time)
        noted = watched.accept_failed_noted_at
        if len(times) < ACCEPT_FAILED_REPEATS or event.time - times[0] > ACCEPT_FAILED_WINDOW_SECONDS:
            return None
        if noted is not None and event.time - noted < ACCEPT_FAILED_WINDOW_SECONDS:
            return None
        watched.accept_failed_noted_at = event.time
        return replace(event, detail=f"{len(times)} in {event.time - times[0]:.0f} s")


def _event_context(event: LogEvent) -> dict[str, Any]:
    context = {"event_name": event.event, "source": event.source, "logged_at": event.time}
    for name in ("server_pid", "client_pid", "detail"):
        value = getattr(event, name)
        if value is not None:
            context[name] = value
    return context


# ---------------------------------------------------------------- metrics and status


def render(data: MpsLogsData, facts: DerivedFacts, out: Families) -> None:
    for state in data.dirs:
        d = state.log_dir
        for (source, event), count in sorted(state.event_counts.items()):
            out.add("mps_log_events_total", [d, source, event], count)
        for event, when in sorted(state.last_event_time.items()):
            out.add("mps_log_last_event_timestamp_seconds", [d, event], when)
        for source, count in sorted(state.lines.items()):
            out.add("mps_log_lines_total", [d, source], count)
        for (source, reason), count in sorted(state.read_problems.items()):
            out.add("mps_log_read_errors_total", [d, source, reason], count)
        for (source, reason), count in sorted(state.file_resets.items()):
            out.add("mps_log_file_resets_total", [d, source, reason], count)


def status(data: MpsLogsData, facts: DerivedFacts, now: float) -> StatusSection:
    events = [event_entry(log_dir, e, now) for log_dir, e in reversed(data.recent)]
    log_dirs = [{"log_dir": d.log_dir, "found_by": d.found_by, "files": [f"{s}.log" for s in d.sources_present]}
                for d in data.dirs]
    return StatusSection({"log_dirs": log_dirs, "recent_events": events[:RECENT_EVENTS_SHOWN]},
                         notes=data.discovery_notes)


UNIT = CollectorUnit("mps_logs", render, status)
