"""MPS control collector: finds the control daemons on the node and asks each what it serves.

Parsers at the top are pure and tested on captures from a real H200 (driver 580); the
shell below runs `nvidia-cuda-mps-control`, one read-only command per call, with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import structlog

from mpswatch.collectors import CollectorUnit
from mpswatch.metrics import Families
from mpswatch.procfs import ProcFS
from mpswatch.runner import Runner, RunResult, run_with_deadline, stopping
from mpswatch.snapshot import (
    SERVER_STATUSES,
    DaemonState,
    DerivedFacts,
    GpuData,
    LogEvent,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsExpectation,
    MpsLogsData,
    MpsServer,
    frozen_map,
)
from mpswatch.verdicts import DEGRADED, DOWN, OK, StatusSection, age, event_entry, in_pod, pod_name, problem

CONTROL_PROGRAM = "nvidia-cuda-mps-control"
SERVER_PROGRAM = "nvidia-cuda-mps-server"
PID_FILE = "nvidia-cuda-mps-control.pid"
NOT_RUNNING_TEXT = "Cannot find MPS control daemon process"

# Only these verbs may ever reach a daemon. Everything else (quit, set_*, start_server,
# shutdown_server, terminate_client, ...) changes or stops MPS and is refused in code.
READ_ONLY_COMMANDS = frozenset(
    {
        "get_server_list",
        "get_server_status",
        "get_client_list",
        "get_device_client_list",
        "ps",
        "get_default_active_thread_percentage",
        "get_active_thread_percentage",
        "get_default_device_pinned_mem_limit",
        "get_device_pinned_mem_limit",
        "get_default_client_priority",
    }
)

_ERROR_REPLY = re.compile(
    r"^(Unknown command|Server (?:\d+ )?not found|Invalid process|Invalid (device|argument)|Error|Failed)",
    re.IGNORECASE,
)
_PINNED_LIMIT = re.compile(r"^([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([KMGT]?)i?B?$", re.IGNORECASE)
# ASCII only (str.isdigit() accepts superscripts that int() refuses) and short (a PID or a
# count; Python refuses to convert integers of thousands of digits)
_DECIMAL = re.compile(r"[0-9]{1,10}")
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
_DAEMON_FLAGS = frozenset({"-d", "--daemon", "-f", "--foreground", "--forground"})
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


Parsed = TypeVar("Parsed")


class ParseError(ValueError):
    pass


class MutatingCommandRefused(ValueError):
    pass


# ---------------------------------------------------------------- pure parsers


def read_only_command(verb: str, *args: int | str) -> str:
    """The one line to send; refuses any verb outside the allowlist and any argument that could
    smuggle a second command (the control program reads commands line by line)."""
    if verb not in READ_ONLY_COMMANDS:
        raise MutatingCommandRefused(f"refusing to send {verb!r}: not a read-only MPS command")
    words = [str(arg) for arg in args]
    for word in words:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", word):
            raise MutatingCommandRefused(f"refusing argument {word!r} to {verb}")
    return " ".join([verb, *words])


def parse_server_list(text: str) -> list[int]:
    pids = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if not _DECIMAL.fullmatch(line):
            raise ParseError(f"server list line is not a PID: {line[:80]!r}")
        pids.append(int(line))
    return pids


def parse_server_status(text: str) -> str:
    status = text.strip()
    if status not in SERVER_STATUSES:
        raise ParseError(f"unknown server status: {status[:80]!r}")
    return status


def parse_percentage(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ParseError(f"not a percentage: {text.strip()[:80]!r}") from None
    if not 0.0 <= value <= 100.0:
        raise ParseError(f"percentage out of range: {value}")
    return value


def parse_pinned_memory_limit(text: str) -> int | None:
    """Bytes, or None when no limit is set (the daemon then prints nothing at all)."""
    text = text.strip()
    if not text:
        return None
    match = _PINNED_LIMIT.match(text)
    if not match:
        raise ParseError(f"not a memory limit: {text[:80]!r}")
    return int(float(match.group(1)) * _UNIT[match.group(2).upper()])


def parse_pinned_limits_env(text: str) -> dict[str, int]:
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, as a client's environment sets it (`0=1G,1=512MB`, devices by
    ordinal or UUID, as in CUDA_VISIBLE_DEVICES): device -> bytes."""
    limits = {}
    for entry in text.split(","):
        device, equals, value = entry.partition("=")
        limit = parse_pinned_memory_limit(value) if equals and device.strip() else None
        if limit is None:
            raise ParseError(f"not a device=limit pair: {entry.strip()[:80]!r}")
        limits[device.strip()] = limit
    return limits


def parse_ps(text: str) -> list[MpsClient]:
    """`ps` prints fixed columns PID ID SERVER DEVICE NAMESPACE COMMAND; COMMAND may hold spaces."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    if lines[0].split()[:2] != ["PID", "ID"]:
        raise ParseError(f"ps output has no header: {lines[0][:80]!r}")
    clients = []
    for line in lines[1:]:
        fields = line.split(None, 5)
        if len(fields) < 5 or not _DECIMAL.fullmatch(fields[0]) or not _DECIMAL.fullmatch(fields[2]):
            raise ParseError(f"ps line not understood: {line[:80]!r}")
        clients.append(
            MpsClient(
                pid=int(fields[0]),
                client_id=int(fields[1]) if _DECIMAL.fullmatch(fields[1]) else None,
                server_pid=int(fields[2]),
                device=fields[3],
                namespace=fields[4],
                command=fields[5].strip() if len(fields) > 5 else "",
            )
        )
    return clients


@dataclass(frozen=True)
class Reply:
    """One command's outcome: `text` when the daemon answered, else a failure `reason`."""

    text: str | None
    reason: str | None
    detail: str
    duration_seconds: float
    grace_seconds: float = 0.0  # extra time the control program got once, being starved of CPU (runner.py)


def classify(result: RunResult, timeout_seconds: float) -> Reply:
    """Tells apart: answered, error reply (exit 0 with error text), not running (exit 1),
    hung (deadline), a program that could not run, and anything else (garbage)."""
    reply = _classified(result, timeout_seconds)
    return replace(reply, grace_seconds=result.grace_seconds) if result.grace_seconds else reply


def _classified(result: RunResult, timeout_seconds: float) -> Reply:
    text = (result.output + result.errors).strip()
    first_line = text.splitlines()[0][:120] if text else ""
    if result.exec_error:
        return Reply(None, "exec_failed", result.exec_error, result.duration_seconds)
    if result.timed_out:
        return Reply(None, "timeout", f"no answer within {timeout_seconds:g} s", result.duration_seconds)
    if result.truncated:
        return Reply(None, "garbage_output", "reply larger than the output cap", result.duration_seconds)
    if NOT_RUNNING_TEXT in result.output or NOT_RUNNING_TEXT in result.errors:
        return Reply(None, "not_running", NOT_RUNNING_TEXT, result.duration_seconds)
    if result.returncode != 0:
        return Reply(None, "garbage_output", f"exit status {result.returncode}: {first_line!r}", result.duration_seconds)
    if _ERROR_REPLY.match(first_line):
        return Reply(None, "error_reply", first_line, result.duration_seconds)
    return Reply(result.output, None, "", result.duration_seconds)


def full_uuid(device: str, uuids: list[str]) -> str:
    """`ps` cuts the UUID after its third group; the full one, when exactly one GPU matches."""
    matches = [uuid for uuid in uuids if uuid.startswith(device)]
    return matches[0] if len(matches) == 1 else device


# ---------------------------------------------------------------- discovery


@dataclass(frozen=True)
class DiscoverySettings:
    pipe_dirs: tuple[str, ...] = ()  # when set, only these
    default_pipe_dirs: tuple[str, ...] = ("/tmp/nvidia-mps", "/run/nvidia-mps")
    device_plugin_root: str = "/run/nvidia/mps"


def looks_like_pipe_dir(path: Path) -> bool:
    return (path / "control").exists() or (path / PID_FILE).exists()


def is_daemon(argv: list[str]) -> bool:
    """A running daemon, not a one-off client run of the same program (an admin's query, ours)."""
    return any(arg in _DAEMON_FLAGS for arg in argv[1:])


@dataclass(frozen=True)
class DirsFound:
    """One search for a kind of MPS directory (pipe or log).

    dirs: (dir, found_by) pairs. owners: for a dir found only in daemons' environments, the users
    those daemons run as: its files are read only when one of them owns them. refused: dirs a daemon
    named that the agent does not trust, and why. unreadable: daemons whose environment could not be
    read, counted by reason; None when no daemon was looked at (the dirs are configured)."""

    dirs: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)
    owners: dict[str, frozenset[int]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, int] | None = None


def configured_dirs(dirs: Iterable[str]) -> DirsFound:
    return DirsFound([(d, "configured") for d in dirs])


def discover_mps_dirs(
    *,
    defaults: Iterable[str],
    device_plugin_root: str,
    leaf: str,
    env_var: str,
    env_default: str,
    accept: Callable[[Path], bool],
    procfs: ProcFS,
    hint: str,
) -> DirsFound:
    """The dirs of one kind (pipe or log): the defaults, the device plugin's per-resource dirs, and
    what running daemons were started with. A daemon's dir is trusted only when the daemon runs as
    root or as the dir's owner: another user cannot point the agent at what is not theirs."""
    found: dict[str, str] = {}
    for default in defaults:
        if accept(Path(default)):
            found.setdefault(default, "default")
    root = Path(device_plugin_root)
    # resource names hold a slash (nvidia.com/gpu), so the dir sits one to three levels down
    for pattern in (f"*/{leaf}", f"*/*/{leaf}", f"*/*/*/{leaf}"):
        for d in sorted(root.glob(pattern)):
            if d.is_dir() and accept(d):
                found.setdefault(str(d), "device_plugin")
    plugin_dirs = [os.path.relpath(d, root) for d, by in found.items() if by == "device_plugin"]
    environments, unreadable = procfs.environments_of(CONTROL_PROGRAM, is_daemon)
    owners: dict[str, set[int]] = {}
    refused: dict[str, str] = {}
    for process in environments:
        directory = process.env.get(env_var) or env_default
        if not os.path.isabs(directory):
            continue
        directory = os.path.normpath(directory)
        if not os.path.isdir(directory) and any(directory.endswith(f"/{d}") for d in plugin_dirs):
            continue  # a device plugin daemon's dir as its container mounts it (/mps/<resource>/...), found above
        distrust = _distrust(process.uid, directory)
        if distrust is not None:
            refused.setdefault(directory, f"{CONTROL_PROGRAM} pid {process.pid} {distrust}")
            continue
        found.setdefault(directory, "process")
        if found[directory] == "process" and process.uid is not None:
            owners.setdefault(directory, set()).add(process.uid)
    for directory in found:
        refused.pop(directory, None)  # another daemon, or a default, vouches for it
    notes = []
    if unreadable:
        notes.append(
            f"cannot read the environment of {CONTROL_PROGRAM} pid {', '.join(map(str, unreadable))} "
            f"to find its {env_var} (needs root with CAP_SYS_PTRACE and, for another user's process, "
            f"CAP_DAC_READ_SEARCH: deploy/README.md); {hint}"
        )
    notes += [f"not watching {directory}, the {env_var} of {why}; {hint}" for directory, why in sorted(refused.items())]
    counts = {"permission": 0}
    for reason in unreadable.values():
        counts[reason] = counts.get(reason, 0) + 1
    return DirsFound(sorted(found.items()), notes, {d: frozenset(uids) for d, uids in owners.items()}, refused, counts)


def _distrust(uid: int | None, directory: str) -> str | None:
    """Why a dir named by a daemon running as `uid` is not trusted; None when it is (the daemon
    runs as root, or owns the dir)."""
    if uid == 0:
        return None
    if uid is None:
        return "runs as a user this agent cannot read"
    try:
        owner = os.stat(directory).st_uid
    except OSError as err:
        return f"runs as uid {uid} and its dir cannot be checked ({err.strerror})"
    return None if owner == uid else f"runs as uid {uid}, and the dir is owned by uid {owner}"


def discover_pipe_dirs(settings: DiscoverySettings, procfs: ProcFS) -> DirsFound:
    """The pipe dirs to watch, and what could not be read or was refused."""
    if settings.pipe_dirs:
        return configured_dirs(settings.pipe_dirs)
    return discover_mps_dirs(
        defaults=settings.default_pipe_dirs,
        device_plugin_root=settings.device_plugin_root,
        leaf="pipe",
        env_var="CUDA_MPS_PIPE_DIRECTORY",
        env_default=DEFAULT_PIPE_DIR,
        accept=looks_like_pipe_dir,
        procfs=procfs,
        hint="name its pipe dir with --pipe-dir",
    )


def plugin_resource(pipe_dir: str, device_plugin_root: str) -> str | None:
    """The device plugin's resource whose daemon serves `pipe_dir` (`nvidia.com/gpu` for
    `<root>/nvidia.com/gpu/pipe`: the plugin makes one pipe dir per resource), or None when the dir is
    not the plugin's."""
    path, root = PurePosixPath(os.path.normpath(pipe_dir)), PurePosixPath(os.path.normpath(device_plugin_root))
    if path.name != "pipe" or not path.parent.is_relative_to(root) or path.parent == root:
        return None
    return str(path.parent.relative_to(root))


def search_description(settings: DiscoverySettings) -> tuple[str, ...]:
    if settings.pipe_dirs:
        return settings.pipe_dirs
    return (
        *settings.default_pipe_dirs,
        f"{settings.device_plugin_root}/*/pipe",
        f"CUDA_MPS_PIPE_DIRECTORY of running {CONTROL_PROGRAM} processes",
    )


# ---------------------------------------------------------------- I/O shell


class ControlChannel:
    """Talks to one daemon: one command per child, never two in flight."""

    def __init__(self, pipe_dir: str, control_bin: str, runner: Runner, timeout_seconds: float,
                 procfs: ProcFS | None = None) -> None:
        self.pipe_dir = pipe_dir
        self._procfs = procfs or ProcFS()
        self.control_bin = control_bin
        self.timeout_seconds = timeout_seconds
        self._runner = runner
        self._lock = threading.Lock()
        self._env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir}

    def ask(self, verb: str, *args: int | str) -> Reply:
        line = read_only_command(verb, *args)
        timeout = self.timeout_seconds
        with self._lock:
            result = self._runner([self.control_bin], (line + "\n").encode(), self._env, timeout,
                                  give_up=self._daemon_stopped)
        if result.grace_seconds:
            structlog.get_logger().debug("command_starved", collector="mps_control", pipe_dir=self.pipe_dir, command=verb,
                                         grace_seconds=result.grace_seconds, seen=result.starved_detail,
                                         timed_out=result.timed_out)
        return classify(result, timeout)

    def _daemon_stopped(self) -> bool:
        """At a command's deadline: a stopped daemon (SIGSTOP, a debugger) will not answer, however long
        its starved control program is given."""
        pid = read_pid_file(self.pipe_dir)
        return pid is not None and self._procfs.state(pid) in ("T", "t")


class _Hung(Exception):
    pass


@dataclass
class _DaemonProbe:
    """Queries one daemon once, within its share of the cycle; collects durations and failures.

    Each command gets the whole command timeout. Once the share is used up no further command is
    sent: a daemon that answers, however slowly (as on a node whose CPUs are saturated), is slow, not
    hung; what was not asked is unknown this cycle (`not_asked`)."""

    channel: ControlChannel
    deadline: float  # time.monotonic() after which no further command is sent
    durations: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    not_asked: list[str] = field(default_factory=list)
    starved: int = 0  # commands that got their deadline once more, starved of CPU

    def ask(self, verb: str, *args: int | str) -> Reply:
        if self.durations and time.monotonic() >= self.deadline:
            self.not_asked.append(verb)
            return Reply(None, None, "not asked: the daemon's share of the cycle was used up", 0.0)
        reply = self.channel.ask(verb, *args)
        self.durations[verb] = reply.duration_seconds
        self.starved += 1 if reply.grace_seconds else 0
        if reply.reason:
            self.failures.append((verb, reply.reason))
        return reply

    def parsed(self, verb: str, parser: Callable[[str], Parsed], *args: int | str) -> Parsed | None:
        """Parsed answer or None; a timeout raises so the daemon is reported hung."""
        reply = self.ask(verb, *args)
        if reply.reason == "timeout":
            raise _Hung(f"{verb}: {reply.detail}")
        if reply.text is None:
            return None
        try:
            return parser(reply.text)
        except ParseError:
            self.failures.append((verb, "garbage_output"))
            return None


def read_pid_file(pipe_dir: str) -> int | None:
    """At most a few bytes of a regular file: /tmp/nvidia-mps can be made by anyone, and a FIFO or a
    link to /dev/zero in its place must not block or flood the agent."""
    try:
        fd = os.open(os.path.join(pipe_dir, PID_FILE), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if _DECIMAL.fullmatch(text) else None


def probe_daemon(
    pipe_dir: str,
    found_by: str,
    channel: ControlChannel,
    procfs: ProcFS,
    client_limit: int,
    settings_from: MpsDaemon | None = None,
    unchanged_from: MpsDaemon | None = None,
) -> MpsDaemon:
    """One daemon's state, with this probe's command durations and failures (counted per command and
    reason). Each command waits at most the command timeout (once more for a control program starved of
    CPU: runner.py), and no command is started after twice that: a slow daemon answers less, not never.

    Every command the agent sends adds about five lines to the daemon's control.log, so the
    settings (active thread percentages, pinned memory limit), which change rarely and apply only
    to new servers and clients, are taken from `settings_from` when given; a new server's are asked.
    With `unchanged_from` (a liveness query), only get_server_list is sent when it lists the same servers
    as that earlier probe, whose servers and clients are kept."""
    probe = _DaemonProbe(channel, deadline=time.monotonic() + 2 * channel.timeout_seconds)
    daemon = _probed(probe, pipe_dir, found_by, channel, procfs, client_limit, settings_from, unchanged_from)
    failures: dict[tuple[str, str], int] = {}
    for key in probe.failures:
        failures[key] = failures.get(key, 0) + 1
    if probe.not_asked and daemon.up:
        daemon = replace(daemon, reason=f"{daemon.reason}; answering slowly: not asked this cycle: {', '.join(probe.not_asked)}")
    return replace(daemon, command_durations=frozen_map(probe.durations), command_failures=frozen_map(failures),
                   commands_not_asked=tuple(probe.not_asked), commands_starved_total=probe.starved)


def _probed(
    probe: _DaemonProbe,
    pipe_dir: str,
    found_by: str,
    channel: ControlChannel,
    procfs: ProcFS,
    client_limit: int,
    settings_from: MpsDaemon | None,
    unchanged_from: MpsDaemon | None = None,
) -> MpsDaemon:
    base = MpsDaemon(pipe_dir=pipe_dir, found_by=found_by, state=DaemonState.UP, reason="", client_limit=client_limit)
    if not Path(pipe_dir).is_dir():
        where = " (found in a daemon's environment: mount the host's dir at the same path)" if found_by == "process" else ""
        return replace(base, state=DaemonState.NO_PIPE_DIR, reason=f"pipe dir {pipe_dir} does not exist{where}")
    pid = read_pid_file(pipe_dir)
    pid_alive = pid is not None and _is_control_daemon(procfs, pid)
    base = replace(base, pid=pid if pid_alive else None)

    reply = probe.ask("get_server_list")
    if reply.reason:
        state, why = _why_down(reply, pid, pid_alive, procfs)
        orphans = None
        if state in (DaemonState.NOT_RUNNING, DaemonState.STALE_PID_FILE):
            orphans = orphaned_servers(pipe_dir, procfs)
            if orphans:
                why += (f"; MPS server {', '.join(map(str, orphans))} runs on without it (orphaned): its clients"
                        " keep running, new clients start without MPS")
        return replace(base, state=state, reason=why, orphaned_server_pids=orphans)
    try:
        server_pids = parse_server_list(reply.text or "")
    except ParseError as err:
        probe.failures.append(("get_server_list", "garbage_output"))
        return replace(base, state=DaemonState.GARBAGE, reason=f"get_server_list: {err}")
    if unchanged_from is not None and sorted(server_pids) == sorted(s.pid for s in unchanged_from.servers):
        return replace(unchanged_from, pid=base.pid)

    try:
        known_atp = {s.pid: s.active_thread_percentage for s in settings_from.servers} if settings_from else {}
        servers = tuple(
            MpsServer(
                pid=spid,
                uid=procfs.uid(spid),
                status=probe.parsed("get_server_status", parse_server_status, spid),
                active_thread_percentage=known_atp[spid]
                if known_atp.get(spid) is not None
                else probe.parsed("get_active_thread_percentage", parse_percentage, spid),
            )
            for spid in server_pids
        )
        # an idle daemon (no server) answers `ps` with `Server not found` (H200, driver 580): a fact, not a failure
        clients = probe.parsed("ps", parse_ps) if server_pids else []
        if settings_from is not None:
            default_atp = settings_from.default_active_thread_percentage
            pinned = settings_from.default_pinned_memory_limit_bytes
            pinned_known = settings_from.default_pinned_memory_limit_known
        else:
            default_atp = probe.parsed("get_default_active_thread_percentage", parse_percentage)
            failed_before = len(probe.failures)
            pinned = probe.parsed("get_default_device_pinned_mem_limit", parse_pinned_memory_limit, 0)
            pinned_known = len(probe.failures) == failed_before and not probe.not_asked
    except _Hung as hung:
        state, why = DaemonState.HUNG, f"answered get_server_list, then hung: {hung}{_stopped_note(procfs, pid)}"
        return replace(base, state=state, reason=why)

    described = "client list unavailable" if clients is None else f"{len(clients)} client(s)"
    return replace(
        base,
        reason=f"answering; {len(servers)} server(s), {described}",
        servers=servers,
        clients=None if clients is None else tuple(clients),
        default_active_thread_percentage=default_atp,
        default_pinned_memory_limit_bytes=pinned,
        default_pinned_memory_limit_known=pinned_known,
    )


def orphaned_servers(pipe_dir: str, procfs: ProcFS) -> tuple[int, ...] | None:
    """MPS servers started for `pipe_dir` (by their environment) that outlived their daemon: they keep
    serving their clients and hold GPU memory. None when a server's environment cannot be read."""
    found = []
    for spid in procfs.pids_running(SERVER_PROGRAM):
        try:
            env = procfs.environ(spid)
        except PermissionError:
            return None
        if env is not None and os.path.normpath(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR) == pipe_dir:
            found.append(spid)
    return tuple(sorted(found))


def _is_control_daemon(procfs: ProcFS, pid: int) -> bool:
    argv = procfs.cmdline(pid)
    return argv is not None and bool(argv) and os.path.basename(argv[0]) == CONTROL_PROGRAM


def _stopped_note(procfs: ProcFS, pid: int | None) -> str:
    if pid is not None and procfs.state(pid) in ("T", "t"):
        return f" (daemon pid {pid} is stopped, e.g. by SIGSTOP)"
    return ""


def _why_down(reply: Reply, pid: int | None, pid_alive: bool, procfs: ProcFS) -> tuple[DaemonState, str]:
    if reply.reason == "timeout":
        return DaemonState.HUNG, f"get_server_list: {reply.detail}{_stopped_note(procfs, pid)}"
    if reply.reason == "exec_failed":
        return DaemonState.EXEC_FAILED, f"cannot run the control program: {reply.detail}"
    if reply.reason == "not_running":
        if pid is not None and not pid_alive:
            return DaemonState.STALE_PID_FILE, f"stale pid file: {PID_FILE} names pid {pid}, which is not running"
        if pid_alive:
            return DaemonState.NOT_RUNNING, f"daemon pid {pid} runs but the control program cannot reach it"
        return DaemonState.NOT_RUNNING, "no control daemon is running on this pipe dir"
    return DaemonState.GARBAGE, f"get_server_list: {reply.reason}: {reply.detail}"


# ---------------------------------------------------------------- state changes


def state_changes(prev: MpsDaemon | None, cur: MpsDaemon) -> list[tuple[str, str, dict[str, Any]]]:
    """(level, event, context) for what changed since the last cycle; nothing when nothing did.
    An unknown value (a query that failed once) is not a change."""
    changes: list[tuple[str, str, dict[str, Any]]] = []
    was_up = prev.up if prev else None
    if cur.up and was_up is not True:
        changes.append(("info", "daemon_up", {"pid": cur.pid, "found_by": cur.found_by}))
    if not cur.up and (was_up is not False or prev is None or prev.state is not cur.state):
        changes.append(("warning", "daemon_down", {"state": cur.state.value, "reason": cur.reason}))
    if not cur.up:
        return changes
    before = {s.pid: s for s in (prev.servers if prev and prev.up else ())}
    for server in cur.servers:
        old = before.pop(server.pid, None)
        if old is None:
            changes.append(("info", "server_seen", {"server_pid": server.pid, "status": server.status}))
        if server.status is None:
            continue
        if server.status == "FAULT" and (old is None or old.status != "FAULT"):
            changes.append(("warning", "server_fault", {"server_pid": server.pid}))
        elif old is not None and old.status == "FAULT" and server.status != "FAULT":
            changes.append(("info", "server_recovered", {"server_pid": server.pid, "status": server.status}))
    for gone in before:
        changes.append(("info", "server_gone", {"server_pid": gone}))
    if cur.clients is None:
        return changes
    old_counts = prev.clients_per_device() if prev and prev.up and prev.clients is not None else {}
    for (server_pid, device), count in cur.clients_per_device().items():
        if count >= cur.client_limit > old_counts.get((server_pid, device), 0):
            changes.append(
                ("warning", "client_limit_reached", {"server_pid": server_pid, "device": device, "clients": count})
            )
    return changes


def servers_lost(serving: frozenset[int], cur: MpsDaemon) -> tuple[list[int], frozenset[int]]:
    """(servers lost, servers serving clients now). Lost: last seen serving clients, and no longer
    listed while the daemon is up: killed or crashed, taking their clients with them. The daemon logs
    that as `exited with status 0`, as it does a normal shutdown (seen on an H200, driver 580). A
    cycle whose `ps` failed (as it does right after such a death) keeps what was serving before; a
    daemon that goes down takes its servers along, which is not counted."""
    if not cur.up:
        return [], frozenset()
    listed = {s.pid for s in cur.servers}
    now = frozenset(c.server_pid for c in cur.clients) if cur.clients is not None else serving & listed
    return sorted(serving - listed), now


# ---------------------------------------------------------------- what changed, without asking

CHANGE_POLL_MODES = ("on_change", "every_cycle")
_LIVE_STATES = frozenset("RSDI")  # running, sleeping, disk wait, idle: a daemon that may answer


@dataclass(frozen=True)
class CheapSignals:
    """What the agent knows of MPS without asking a daemon (every command is a control.log entry), taken
    from the other collectors' latest data. A change in either sends the daemons a full probe.

    log_events: MPS log events counted so far in the followed logs (clients connecting and leaving,
    servers starting and exiting, faults); None when no control.log can be read: the daemons are then
    asked every cycle. gpu_clients: the MPS client PIDs NVML lists; None: unknown."""

    log_events: int | None = None
    gpu_clients: frozenset[int] | None = None


def cheap_signals(logs: MpsLogsData | None, gpu: GpuData | None) -> CheapSignals:
    log_events = None
    if logs is not None and any("control" in d.sources_present for d in logs.dirs):
        log_events = sum(sum(d.event_counts.values()) for d in logs.dirs)
    gpu_clients = None
    if gpu is not None and gpu.gpus and all(g.processes is not None for g in gpu.gpus):
        gpu_clients = frozenset(p.pid for g in gpu.gpus for p in g.processes or () if p.kind == "mps_client")
    return CheapSignals(log_events, gpu_clients)


@dataclass(frozen=True)
class DaemonProcess:
    """The daemon as /proc shows it, read every cycle without a command: its PID (pid file), whether it can
    answer (`live`: not gone, stopped or a zombie) and its children, the MPS servers it started."""

    pid: int | None
    live: bool
    children: frozenset[int] | None


def daemon_process(pipe_dir: str, procfs: ProcFS) -> DaemonProcess:
    pid = read_pid_file(pipe_dir)
    if pid is None:
        return DaemonProcess(None, False, None)
    state, tasks = procfs.state(pid), procfs.tasks(pid)
    if not tasks:  # gone, or its threads hidden
        return DaemonProcess(pid, state in _LIVE_STATES, None)
    children: set[int] = set()
    for task in tasks:  # a child is listed under the thread that forked it
        text = procfs.read_text(f"{pid}/task/{task}/children", limit=1 << 16)
        if text is None:
            return DaemonProcess(pid, state in _LIVE_STATES, None)
        children.update(int(word) for word in text.split() if _DECIMAL.fullmatch(word))
    return DaemonProcess(pid, state in _LIVE_STATES, frozenset(children))


# ---------------------------------------------------------------- collector


@dataclass
class _WatchedDaemon:
    """What the collector keeps of one daemon from cycle to cycle."""

    pipe_dir: str
    found_by: str
    resource: str | None  # the device plugin's, when the pipe dir is under its root
    channel: ControlChannel | None = None
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # totals since the agent started
    servers_lost: int = 0
    starved: int = 0  # commands given their deadline once more, starved of CPU, since the agent started
    serving: frozenset[int] = frozenset()  # servers that had clients, for servers_lost()
    previous: MpsDaemon | None = None
    settings_read_at: float = float("-inf")  # time.monotonic()
    started_at: float = float("-inf")  # time.monotonic() its last probe started: the rotation's order
    slow: bool = False  # its last probe took longer than one command timeout (hung, or answering slowly)
    completed_cycle: int = 0  # the cycle in which its last probe ended
    probed_at: float = float("-inf")  # time.monotonic() of its last full probe
    answered_at: float = float("-inf")  # time.monotonic() of its last answer (a full probe or a liveness query)
    seen: tuple[DaemonProcess, CheapSignals] | None = None  # what the cheap signals showed at its last full probe


PROBE_WORKERS = 32  # control programs run at once, at most
ROTATION_WORKERS = PROBE_WORKERS // 4  # of which these always take the daemon probed longest ago


class MpsControlCollector:
    """Probes every watched daemon once a cycle on a bounded pool of workers, within a per-cycle budget.

    A cycle waits for its probes at most `2 × command timeout` (one daemon's share) and then returns
    what it has: a daemon whose probe has not ended (many daemons, hanging ones) keeps its last result,
    with the time it was measured, and is counted as deferred; its probe goes on into the next cycle.
    So a large or hostile set of pipe dirs costs each daemon freshness, never the collector its data.
    Workers take daemons in the order of their last probe's start (oldest first); all but
    ROTATION_WORKERS of them take daemons whose last probe was quick first, so that hanging daemons
    cannot hold back answering ones, while the rotation workers ensure each daemon is probed in turn."""

    name = "mps_control"

    def __init__(
        self,
        *,
        control_bin: str,
        discovery: DiscoverySettings,
        interval_seconds: float = 2.0,
        command_timeout_seconds: float = 1.0,
        client_limit: int = 48,
        procfs: ProcFS | None = None,
        runner: Runner = run_with_deadline,
        settings_refresh_seconds: float = 30.0,
        expected: str = "auto",
        signals: Callable[[], CheapSignals] | None = None,
        heartbeat_seconds: float = 60.0,
        liveness_seconds: float = 8.0,
    ) -> None:
        self.interval_seconds = interval_seconds
        self._signals = signals
        self._heartbeat = heartbeat_seconds
        self._liveness = liveness_seconds
        self._expected = expected
        self._settings_refresh = settings_refresh_seconds
        # a cycle waits for its probes at most twice the command timeout (the rest are deferred)
        self.deadline_seconds = command_timeout_seconds * 2 + 1.0
        self._control_bin = control_bin
        self._discovery = discovery
        self._timeout = command_timeout_seconds
        self._client_limit = client_limit
        self._procfs = procfs or ProcFS()
        self._runner = runner
        self._daemons: dict[str, _WatchedDaemon] = {}  # by pipe dir
        self._refused: dict[str, str] = {}  # pipe dirs named by daemons not trusted, and why (logged once)
        self._uuids: list[str] = []
        self._budget = 2 * command_timeout_seconds  # how long a cycle waits for its probes
        self._control_resolved = control_bin
        # the work queue, under _lock: the cycle, daemons waiting for a worker, in each lane's order
        self._lock = threading.Condition()
        self._cycle = 0
        self._pending: set[str] = set()
        self._in_flight: set[str] = set()
        self._outstanding = 0  # daemons watched at the cycle's start whose probe has not ended in it
        self._rotation_order: list[str] = []  # reversed: pop() takes the next
        self._quick_first_order: list[str] = []
        self._workers: list[threading.Thread] = []
        self._current_signals = CheapSignals()
        self._log = structlog.get_logger().bind(collector=self.name)

    def collect(self) -> MpsControlData:
        cycle_ends = time.monotonic() + self._budget  # discovery included: the collector's deadline holds
        discovered = discover_pipe_dirs(self._discovery, self._procfs)
        notes = discovered.notes
        for pipe_dir, why in discovered.refused.items():
            if self._refused.get(pipe_dir) != why:
                self._log.warning("pipe_dir_refused", pipe_dir=pipe_dir, reason=why)
        self._refused = discovered.refused
        resolved = self._control_bin if "/" in self._control_bin else shutil.which(self._control_bin)
        if resolved is None or not os.access(resolved, os.X_OK):
            notes.append(f"control program {self._control_bin} not found or not executable (no NVIDIA driver here?)")
        self._control_resolved = resolved or self._control_bin
        self._uuids = self._procfs.gpu_uuids()
        signals = self._signals() if self._signals is not None else CheapSignals()
        if self._signals is not None and self._heartbeat > 0 and signals.log_events is None:  # an agent, not one look
            notes.append("no MPS control.log can be read (an unprivileged agent, or another log dir: --log-dir): "
                         "every daemon is asked every cycle, and each command grows its control.log")
        self._current_signals = signals
        with self._lock:
            self._remember(dict(discovered.dirs))
            self._start_cycle()
            while self._outstanding and self._lock.wait(max(0.0, cycle_ends - time.monotonic())):
                pass
            watched = [self._daemons[pipe_dir] for pipe_dir in sorted(self._daemons)]
            cycle = self._cycle
        daemons = tuple(w.previous for w in watched if w.previous is not None)
        unprobed = tuple(w.pipe_dir for w in watched if w.previous is None)
        deferred = tuple(w.pipe_dir for w in watched if w.completed_cycle != cycle)
        if deferred:
            notes.append(f"{len(deferred)} of {len(watched)} daemon(s) not probed within this cycle's {self._budget:g} s "
                         f"budget ({len(unprobed)} never yet): their data is from an earlier cycle (age_seconds)")
        reaped = os.times()  # the agent's children are its control-program runs (mpswatch.runner), once reaped
        return MpsControlData(daemons=daemons, searched=search_description(self._discovery), discovery_notes=tuple(notes),
                              control_program_cpu_seconds=reaped.children_user + reaped.children_system,
                              configured_only=bool(self._discovery.pipe_dirs), expected=self._expected,
                              unreadable_daemons=None if discovered.unreadable is None else frozen_map(discovered.unreadable),
                              deferred=deferred, not_yet_probed=unprobed)

    def _start_cycle(self) -> None:
        """Under _lock: every watched daemon not being probed is due again, in each lane's order."""
        self._cycle += 1
        self._pending = set(self._daemons) - self._in_flight
        self._outstanding = len(self._daemons)
        due = sorted(self._pending, key=lambda d: (self._daemons[d].started_at, d))
        self._rotation_order = due[::-1]
        self._quick_first_order = sorted(due, key=lambda d: self._daemons[d].slow)[::-1]
        wanted = min(PROBE_WORKERS, len(self._pending) + len(self._in_flight))
        while len(self._workers) < wanted:
            rotation = len(self._workers) < ROTATION_WORKERS
            worker = threading.Thread(target=self._work, args=(rotation,), daemon=True,
                                      name=f"mps-control-{len(self._workers)}")
            worker.start()
            self._workers.append(worker)
        self._lock.notify_all()

    def _take(self, rotation: bool) -> _WatchedDaemon | None:
        """Under _lock: the next due daemon in this worker's lane, marked in flight."""
        order = self._rotation_order if rotation else self._quick_first_order
        while order:
            pipe_dir = order.pop()
            if pipe_dir in self._pending and pipe_dir in self._daemons:
                self._pending.discard(pipe_dir)
                self._in_flight.add(pipe_dir)
                watched = self._daemons[pipe_dir]
                watched.started_at = time.monotonic()
                return watched
        return None

    def _work(self, rotation: bool) -> None:
        """One worker: probes due daemons, one at a time, for as long as the agent runs."""
        while True:
            with self._lock:
                watched = self._take(rotation)
                while watched is None:
                    self._lock.wait()
                    watched = self._take(rotation)
            started = time.monotonic()
            try:
                self._probe(watched, self._control_resolved)
            except Exception as err:  # the worker must live on; the daemon keeps its last result
                self._log.error("daemon_probe_failed", pipe_dir=watched.pipe_dir, error=repr(err), exc_info=err)
            with self._lock:
                self._in_flight.discard(watched.pipe_dir)
                watched.slow = time.monotonic() - started > self._timeout
                if watched.completed_cycle != self._cycle and self._daemons.get(watched.pipe_dir) is watched:
                    self._outstanding -= 1
                watched.completed_cycle = self._cycle
                self._lock.notify_all()

    def _remember(self, found: dict[str, str]) -> None:
        """A daemon once found stays watched while its pipe dir is there, so that one that dies shows
        as down rather than vanishing; a pipe dir that was removed is forgotten."""
        for pipe_dir, found_by in found.items():
            if pipe_dir not in self._daemons:
                self._log.info("daemon_found", pipe_dir=pipe_dir, found_by=found_by)
                resource = plugin_resource(pipe_dir, self._discovery.device_plugin_root)
                self._daemons[pipe_dir] = _WatchedDaemon(pipe_dir, found_by, resource)
        for pipe_dir, watched in list(self._daemons.items()):
            if pipe_dir not in found and watched.found_by != "configured" and not looks_like_pipe_dir(Path(pipe_dir)):
                self._log.info("daemon_forgotten", pipe_dir=pipe_dir, reason="pipe dir removed")
                del self._daemons[pipe_dir]

    def _asking(self, watched: _WatchedDaemon, seen: tuple[DaemonProcess, CheapSignals]) -> tuple[str, str | None]:
        """(poll mode, what to send): "probe" (every command), "liveness" (get_server_list alone) or None
        (nothing: the cheap signals show no change, and the last answer is recent).

        A daemon is asked in full when it is new or was not up, when /proc shows its process or its servers
        change, when the logs or NVML show a client or server event, and at the heartbeat; a daemon whose
        process looks alive gets get_server_list every `liveness_seconds`, so that one that hangs is seen
        within that and a command's deadline. Every cycle without readable logs, or without a daemon
        process whose children /proc lists (no pid file, a dead daemon: asking it writes nothing; a kernel
        without /proc/PID/task/TID/children)."""
        now, previous = time.monotonic(), watched.previous
        process, signals = seen
        if self._heartbeat <= 0 or signals.log_events is None or process.children is None:
            return "every_cycle", "probe"  # no log to show a change, or no daemon process to watch in /proc
        if (previous is None or not previous.up or previous.commands_not_asked or not process.live
                or watched.seen != seen or now - watched.probed_at >= self._heartbeat):
            return "on_change", "probe"
        if now - watched.answered_at >= self._liveness:
            return "on_change", "liveness"
        return "on_change", None

    def _probe(self, watched: _WatchedDaemon, control_bin: str) -> MpsDaemon:
        pipe_dir, previous = watched.pipe_dir, watched.previous
        if watched.channel is None or watched.channel.control_bin != control_bin:
            watched.channel = ControlChannel(pipe_dir, control_bin, self._runner, self._timeout, self._procfs)
        seen = (daemon_process(pipe_dir, self._procfs), self._current_signals)
        mode, send = self._asking(watched, seen)
        if send is None and previous is not None:
            watched.previous = replace(previous, poll_mode=mode)
            return watched.previous
        fresh = time.monotonic() - watched.settings_read_at < self._settings_refresh
        settings_from = previous if fresh and previous is not None and previous.up else None
        unchanged_from = previous if send == "liveness" else None
        asked_at = time.monotonic()
        try:
            daemon = probe_daemon(
                pipe_dir, watched.found_by, watched.channel, self._procfs, self._client_limit, settings_from,
                unchanged_from,
            )
        except Exception as err:  # one daemon's surprise must not cost the others their data
            self._log.error("daemon_probe_failed", pipe_dir=pipe_dir, error=repr(err), exc_info=err)
            daemon = MpsDaemon(pipe_dir, watched.found_by, DaemonState.GARBAGE, f"unexpected: {err!r}"[:200],
                               client_limit=self._client_limit,
                               command_failures=frozen_map({("get_server_list", "garbage_output"): 1}))
        if stopping():  # its command was killed by the agent stopping or reloading: neither logged nor counted
            return previous if previous is not None else daemon
        daemon = replace(daemon, measured_at=time.time(), poll_mode=mode)
        full = unchanged_from is None or daemon.servers is not unchanged_from.servers
        if full:
            watched.probed_at, watched.seen = asked_at, seen
        elif unchanged_from is not None:  # the liveness query alone: the other commands' last durations stand
            daemon = replace(daemon, command_durations=frozen_map({**unchanged_from.command_durations,
                                                                   **daemon.command_durations}))
        if daemon.up:
            watched.answered_at = asked_at
        if daemon.clients:
            daemon = replace(daemon, clients=tuple(replace(c, device=full_uuid(c.device, self._uuids)) for c in daemon.clients))
        daemon = replace(daemon, resource=watched.resource)
        if daemon.up and settings_from is None and not daemon.commands_not_asked and full:
            watched.settings_read_at = time.monotonic()
        for key, count in daemon.command_failures.items():
            watched.failures[key] = watched.failures.get(key, 0) + count
        watched.starved += daemon.commands_starved_total
        lost, watched.serving = servers_lost(watched.serving, daemon)
        watched.servers_lost += len(lost)
        daemon = replace(daemon, command_failures=frozen_map(watched.failures), servers_lost_total=watched.servers_lost,
                         commands_starved_total=watched.starved)
        log = self._log.bind(pipe_dir=pipe_dir)
        for server_pid in lost:
            log.warning("server_lost", server_pid=server_pid, reason="no longer listed while its clients were connected")
        for level, event, context in state_changes(previous, daemon):
            getattr(log, level)(event, **context)
        watched.previous = daemon
        return daemon


# ---------------------------------------------------------------- metrics and status


def render(data: MpsControlData, facts: DerivedFacts, out: Families) -> None:
    out.add("mps_control_daemons", [], len(data.daemons) + len(data.not_yet_probed))
    out.add("mps_control_probes_deferred", [], len(data.deferred))
    if data.control_program_cpu_seconds is not None:
        out.add("mps_control_program_cpu_seconds_total", [], data.control_program_cpu_seconds)
    for reason, count in sorted((data.unreadable_daemons or {}).items()):
        out.add("mps_discovery_unreadable_processes", ["mps_control_daemon", reason], count)
    if facts.mps_expected is not None:
        out.add("mps_control_expected", [facts.mps_expected.reason], 1 if facts.mps_expected.expected else 0)
    for daemon in data.daemons:
        d = daemon.pipe_dir
        out.add("mps_control_up", [d], 1 if daemon.up else 0)
        for state in DaemonState:
            out.add("mps_control_state", [d, state.value], 1 if daemon.state is state else 0)
        if daemon.pid is not None:
            out.add("mps_control_info", [d, daemon.pid], 1)
        if daemon.measured_at is not None:
            out.add("mps_control_probe_timestamp_seconds", [d], daemon.measured_at)
        if daemon.poll_mode is not None:
            for mode in CHANGE_POLL_MODES:
                out.add("mps_control_poll_mode", [d, mode], 1 if daemon.poll_mode == mode else 0)
        if daemon.resource is not None:
            out.add("mps_control_resource_info", [d, daemon.resource], 1)
        for command, seconds in sorted(daemon.command_durations.items()):
            out.add("mps_control_command_duration_seconds", [d, command], seconds)
        for (command, reason), count in sorted(daemon.command_failures.items()):
            out.add("mps_control_command_failures_total", [d, command, reason], count)
        out.add("mps_client_limit", [d], daemon.client_limit)
        out.add("mps_servers_lost_total", [d], daemon.servers_lost_total)
        out.add("mps_control_commands_starved_total", [d], daemon.commands_starved_total)
        if daemon.orphaned_server_pids is not None:
            out.add("mps_orphaned_servers", [d], len(daemon.orphaned_server_pids))
        if not daemon.up:
            continue
        if daemon.default_active_thread_percentage is not None:
            out.add("mps_default_active_thread_ratio", [d], daemon.default_active_thread_percentage / 100)
        if daemon.default_pinned_memory_limit_bytes is not None:
            out.add("mps_default_device_pinned_memory_limit_bytes", [d], daemon.default_pinned_memory_limit_bytes)
        for server in daemon.servers:
            out.add("mps_server_info", [d, server.pid, _uid_label(server.uid)], 1)
        _render_servers(daemon, facts, out)
        for client in daemon.clients or ():
            engine = facts.engine_of_pid.get(client.pid, "")
            out.add("mps_client_info", [d, client.server_pid, client.pid, client.device, client.command, engine], 1)


def _uid_label(uid: int | None) -> str:
    return "" if uid is None else str(uid)


# worst first: the status a (pipe_dir, uid) shows when several servers share it
_STATUS_SEVERITY = ("FAULT", "INITIALIZING", "ACTIVE")


def _render_servers(daemon: MpsDaemon, facts: DerivedFacts, out: Families) -> None:
    """A server's series are named by (pipe_dir, uid), not its PID, so a restart makes no new series:
    MPS runs one server per user per daemon. Servers that share a uid (a new one started while the
    old one is still listed, or several whose owner /proc hides: uid empty) are shown as one: the
    worst status, the lowest thread share, the clients of all, started before the limits if any was."""
    d = daemon.pipe_dir
    by_uid: dict[str, list[MpsServer]] = {}
    for server in daemon.servers:
        by_uid.setdefault(_uid_label(server.uid), []).append(server)
    uid_of_server = {server.pid: _uid_label(server.uid) for server in daemon.servers}
    per_uid: dict[str, int] = {}
    per_device: dict[tuple[str, str], int] = {}
    for client in daemon.clients or ():
        uid = uid_of_server.get(client.server_pid, "")
        per_uid[uid] = per_uid.get(uid, 0) + 1
        per_device[(uid, client.device)] = per_device.get((uid, client.device), 0) + 1
    for uid, servers in sorted(by_uid.items()):
        statuses = {server.status for server in servers if server.status is not None}
        if statuses:
            shown = next(status for status in _STATUS_SEVERITY if status in statuses)
            for status in SERVER_STATUSES:
                out.add("mps_server_status", [d, uid, status], 1 if status == shown else 0)
        shares = [server.active_thread_percentage for server in servers if server.active_thread_percentage is not None]
        if shares:
            out.add("mps_server_active_thread_ratio", [d, uid], min(shares) / 100)
        if daemon.clients is not None:
            out.add("mps_server_clients", [d, uid], per_uid.get(uid, 0))
        starts = [facts.server_starts[(d, s.pid)] for s in servers if (d, s.pid) in facts.server_starts]
        if starts:
            out.add("mps_server_started_before_limits", [d, uid], 1 if any(s.before_limits for s in starts) else 0)
    for (uid, device), count in sorted(per_device.items()):
        out.add("mps_clients", [d, uid, device], count)


def status(data: MpsControlData, facts: DerivedFacts, now: float) -> StatusSection:
    deferred = set(data.deferred)
    daemons = [_daemon_entry(d, facts, now, d.pipe_dir in deferred) for d in data.daemons]
    problems = []
    for d in daemons:
        if d["verdict"] != OK:
            pid = f" (pid {d['pid']})" if d["pid"] is not None else ""
            problems.append(problem(d["verdict"], "daemon", f"daemon {d['pipe_dir']}{pid}", d["reason"]))
        for s in d["servers"]:
            if s["verdict"] != OK:
                problems.append(problem(s["verdict"], "server", f"server {s['pid']} on {d['pipe_dir']}", s["reason"]))
            problems += [problem(c["verdict"], "client",
                                 f"client {c['pid']}{in_pod(c['pod'])} {c['command']} of server {s['pid']}", c["reason"])
                         for c in s["clients"] if c["verdict"] != OK]
    if daemons or data.not_yet_probed:
        servers = sum(len(d["servers"]) for d in daemons)
        clients = sum(len(s["clients"]) for d in daemons for s in d["servers"])
        up = sum(1 for d in daemons if d["state"] == "up")
        summary = f"{len(daemons)} control daemon(s), {up} answering; {servers} server(s); {clients} client(s)"
        if data.not_yet_probed:
            summary += f"; {len(data.not_yet_probed)} more not probed yet"
    else:
        summary = f"no MPS control daemon found; looked in {', '.join(data.searched)}"
        missing = _no_daemon_problem(facts.mps_expected, data.searched)
        if missing is not None:
            problems.append(missing)
        elif facts.mps_expected is not None:
            summary += f"; none expected ({facts.mps_expected.detail})"
    return StatusSection({"daemons": daemons}, tuple(problems), data.discovery_notes, summary)


def _no_daemon_problem(expectation: MpsExpectation | None, searched: tuple[str, ...]) -> dict[str, Any] | None:
    """No daemon is a page where MPS is expected, fine where it is configured not to be, and worth a look
    where nothing says either way."""
    looked = f"looked in {', '.join(searched)}"
    if expectation is None:
        return problem(DEGRADED, "mps", "MPS", f"no control daemon found, and whether MPS is expected is unknown "
                       f"(an engine's environment is hidden, or no engine data); {looked}")
    if expectation.expected:
        return problem(DOWN, "mps", "MPS", f"no control daemon found, but MPS is expected ({expectation.detail}); {looked}")
    if expectation.reason == "configured":
        return None
    return problem(DEGRADED, "mps", "MPS", f"no control daemon found, and none expected ({expectation.detail}; "
                   f"set mps_control.expected = true where GPUs are meant to be shared through MPS); {looked}")


def _server_verdict(daemon: MpsDaemon, server: MpsServer, listed: bool, counts: dict[str, int]) -> tuple[str, str]:
    full = sorted(device for device, n in counts.items() if n >= daemon.client_limit)
    if server.status == "FAULT":
        return DOWN, "FAULT: a client hit a fatal GPU error; new clients are refused until every affected client exits"
    if not listed:
        return DEGRADED, "has clients in `ps` but is not in get_server_list (starting or exiting)"
    if server.status is None:
        return DEGRADED, "status unknown: get_server_status gave no usable answer"
    if server.status == "INITIALIZING":
        return DEGRADED, "INITIALIZING: not yet serving clients"
    if daemon.clients is None:
        return DEGRADED, f"{server.status}; client list unavailable (`ps` gave no usable answer)"
    if full:
        return DEGRADED, f"{counts[full[0]]}/{daemon.client_limit} clients on {', '.join(full)}: the next client will be refused"
    per_device = ", ".join(f"{n}/{daemon.client_limit} on {device}" for device, n in sorted(counts.items()))
    return OK, f"{server.status}; clients {per_device or 'none'}"


def _server_entry(daemon: MpsDaemon, server: MpsServer, listed: bool, facts: DerivedFacts, now: float) -> dict[str, Any]:
    counts = {device: n for (spid, device), n in daemon.clients_per_device().items() if spid == server.pid}
    verdict, reason = _server_verdict(daemon, server, listed, counts)
    fault_cause = None
    if server.status == "FAULT":
        cause = facts.fault_causes.get(server.pid)
        if cause is not None:
            fault_cause = event_entry(*cause, now)
            blamed = cause[1].client_pid
            blamed_pod = in_pod(pod_name(facts.pods.get(blamed))) if blamed is not None else ""
            reason = (f"FAULT: MPS blames client {blamed}{blamed_pod} for a fatal GPU error {age(now - cause[1].time)} "
                      "ago; new clients are refused until every affected client exits")
    client_entries: list[dict[str, Any]] = []
    for client in (c for c in daemon.clients or () if c.server_pid == server.pid):
        if server.status == "FAULT":
            c_verdict, c_reason = DEGRADED, f"server {server.pid} is in FAULT: this client must exit before it recovers"
        else:
            c_verdict, c_reason = OK, f"connected to server {server.pid} on {client.device}"
        client_entries.append(
            {
                "pid": client.pid,
                "client_id": client.client_id,
                "device": client.device,
                "command": client.command,
                "pod": pod_name(facts.pods.get(client.pid)),
                "verdict": c_verdict,
                "reason": c_reason,
                "gpu_memory_bytes": facts.gpu_memory_by_pid.get(client.pid),
            }
        )
    start = facts.server_starts.get((daemon.pipe_dir, server.pid))
    if start is not None and start.limits_after is not None:
        late = _before_limits(daemon, server, start.started, start.limits_after, client_entries, now)
        verdict, reason = (DEGRADED, late) if verdict == OK else (verdict, f"{reason}; {late}")
    return {
        "pid": server.pid,
        "uid": server.uid,
        "status": server.status,
        "active_thread_percentage": server.active_thread_percentage,
        "started_before_limits": None if start is None else start.before_limits,
        "clients_per_device": counts,
        "fault_cause": fault_cause,
        "verdict": verdict,
        "reason": reason,
        "clients": client_entries,
    }


def _before_limits(daemon: MpsDaemon, server: MpsServer, started: LogEvent, limits: LogEvent,
                   clients: list[dict[str, Any]], now: float) -> str:
    """Why a server that started before its daemon's limits were set is a problem, and whom it hits."""
    default = daemon.default_active_thread_percentage
    threads = ""
    if server.active_thread_percentage is not None and default is not None:
        threads = f" (active threads {server.active_thread_percentage:g}% where the daemon's default is {default:g}%)"
    pods = sorted({c["pod"] for c in clients if c["pod"]})
    who = f"; so do its {len(clients)} client(s)" + (f" ({', '.join(pods)})" if pods else "") if clients else ""
    return (f"started {age(now - started.time)} ago, before the daemon's limits were set ({limits.detail}, "
            f"{age(now - limits.time)} ago): it runs with the defaults of before{threads}{who}")


def _daemon_entry(daemon: MpsDaemon, facts: DerivedFacts, now: float, deferred: bool) -> dict[str, Any]:
    servers = [_server_entry(daemon, s, True, facts, now) for s in daemon.servers]
    listed = {s.pid for s in daemon.servers}
    for server_pid in sorted({c.server_pid for c in daemon.clients or ()} - listed):
        servers.append(_server_entry(daemon, MpsServer(server_pid, None, None, None), False, facts, now))
    reason = daemon.reason if daemon.resource is None else f"{daemon.reason}; device plugin resource {daemon.resource}"
    if deferred and daemon.measured_at is not None:
        reason += f"; as of {age(now - daemon.measured_at)} ago (its probe outlasted the cycle's budget)"
    return {
        "pipe_dir": daemon.pipe_dir,
        "found_by": daemon.found_by,
        "resource": daemon.resource,
        "pid": daemon.pid,
        "state": daemon.state.value,
        "client_limit": daemon.client_limit,
        "orphaned_server_pids": None if daemon.orphaned_server_pids is None else list(daemon.orphaned_server_pids),
        "age_seconds": None if daemon.measured_at is None else round(max(0.0, now - daemon.measured_at), 3),
        "default_active_thread_percentage": daemon.default_active_thread_percentage,
        "default_pinned_memory_limit_bytes": daemon.default_pinned_memory_limit_bytes,
        "verdict": OK if daemon.up else DOWN,
        "reason": reason,
        "servers": servers,
    }


UNIT = CollectorUnit("mps_control", render, status)
