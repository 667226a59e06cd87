"""Reads of /proc under an injectable root, so tests and containers can point it elsewhere.

Every reader returns None when the process is gone or unreadable: processes come and
go between a listing and a read, and that is never an error for the agent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


def read_file(path: str, limit: int | None = None) -> bytes:
    """The file (up to `limit` bytes) with bare os calls: the agent reads hundreds of /proc files a
    cycle, and pathlib and buffered file objects cost more than the reads themselves."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks, size = [], 0
        while limit is None or size < limit:
            chunk = os.read(fd, 1 << 16 if limit is None else min(1 << 16, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProcessEnvironment:
    """A process's environment and the user it runs as (None: its status is gone or unreadable)."""

    pid: int
    uid: int | None
    env: dict[str, str]


def unreadable_reason(err: OSError) -> str:
    """Why a process's file could not be read, as a label value: permission or io_error."""
    return "permission" if isinstance(err, PermissionError) else "io_error"


@dataclass(frozen=True)
class ProcFS:
    root: Path = Path("/proc")
    # which processes the agent may see; None: all. Injected by code (the test kit keeps an agent
    # under test to the test's own processes), never by configuration.
    visible: Callable[[int], bool] | None = None
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prefix", str(self.root))

    def pids(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        pids = sorted(int(name) for name in names if name.isascii() and name.isdigit())
        return pids if self.visible is None else [pid for pid in pids if self.visible(pid)]

    def cmdline(self, pid: int) -> list[str] | None:
        raw = self._read_bytes(pid, "cmdline")
        return None if raw is None else parse_cmdline(raw)

    def environ(self, pid: int) -> dict[str, str] | None:
        """None when the process is gone; PermissionError propagates so callers can say why."""
        try:
            raw = read_file(f"{self._prefix}/{pid}/environ")
        except (FileNotFoundError, ProcessLookupError):
            return None
        return parse_environ(raw)

    def state(self, pid: int) -> str | None:
        raw = self._read_bytes(pid, "stat")
        return None if raw is None else parse_stat_state(raw.decode("utf-8", "replace"))

    def uid(self, pid: int) -> int | None:
        raw = self._read_bytes(pid, "status")
        return None if raw is None else parse_status_uid(raw.decode("utf-8", "replace"))

    def pids_running(self, program: str, accept: Callable[[list[str]], bool] = lambda argv: True) -> list[int]:
        """PIDs whose argv[0] basename is `program` and whose argv `accept` takes (comm is cut at 15
        characters, so it cannot tell nvidia-cuda-mps-control from nvidia-cuda-mps-server)."""
        found = []
        for pid in self.pids():
            argv = self.cmdline(pid)
            if argv and os.path.basename(argv[0]) == program and accept(argv):
                found.append(pid)
        return found

    def environments_of(
        self, program: str, accept: Callable[[list[str]], bool] = lambda argv: True
    ) -> tuple[list[ProcessEnvironment], dict[int, str]]:
        """Environments of the running `program`s, and the PIDs whose environment is unreadable with
        why (`permission`: another user's process without the privileges, or `io_error`)."""
        environments, unreadable = [], {}
        for pid in self.pids_running(program, accept):
            try:
                env = self.environ(pid)
            except OSError as err:
                unreadable[pid] = unreadable_reason(err)
                continue
            if env is not None:
                environments.append(ProcessEnvironment(pid, self.uid(pid), env))
        return environments, unreadable

    def read_text(self, relative: str, limit: int = 1 << 20) -> str | None:
        """A small /proc file (relative to the root), or None when it is gone or unreadable."""
        try:
            return self.read_text_or_raise(relative, limit)
        except OSError:
            return None

    def read_text_or_raise(self, relative: str, limit: int = 1 << 20) -> str:
        """A small /proc file (relative to the root); OSError says why it cannot be read."""
        return read_file(f"{self._prefix}/{relative}", limit).decode("utf-8", "replace")

    def link(self, relative: str) -> str | None:
        """Where a /proc link points (`ns/net`: `net:[4026531833]`), or None when it is gone or
        unreadable (another user's process without CAP_SYS_PTRACE)."""
        try:
            return os.readlink(f"{self._prefix}/{relative}")
        except OSError:
            return None

    def socket_inodes(self, pid: int) -> frozenset[int] | None:
        """Inodes of the sockets the process holds open (its `fd/*` links `socket:[N]`), or None
        when its fd table is gone or unreadable (another user's process, or a more privileged one,
        without CAP_SYS_PTRACE: the table may list while its links refuse to be read)."""
        fd_dir = f"{self._prefix}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            return None
        inodes = set()
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except PermissionError:
                return None  # the directory lists, but its links are another's (no CAP_SYS_PTRACE)
            except OSError:
                continue  # closed since the listing
            inode = parse_socket_link(target)
            if inode is not None:
                inodes.add(inode)
        return frozenset(inodes)

    def tasks(self, pid: int) -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir(f"{self._prefix}/{pid}/task") if name.isdigit())
        except OSError:
            return []

    def gpu_uuids(self) -> list[str]:
        """Full UUIDs of the node's GPUs from the driver's /proc files: no NVML call, so the MPS
        control collector can name devices by their full UUID even when NVML is unwell."""
        uuids = []
        for info in sorted((self.root / "driver" / "nvidia" / "gpus").glob("*/information")):
            try:
                text = info.read_text(errors="replace")
            except OSError:
                continue
            uuids += parse_gpu_uuid(text)
        return uuids

    def _read_bytes(self, pid: int, name: str) -> bytes | None:
        try:
            return read_file(f"{self._prefix}/{pid}/{name}")
        except OSError:
            return None


def parse_cmdline(raw: bytes) -> list[str]:
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def parse_environ(raw: bytes) -> dict[str, str]:
    env = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def stat_fields(text: str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else []


def parse_stat_state(text: str) -> str | None:
    """The state letter (field 3 of stat)."""
    fields = stat_fields(text)
    return fields[0] if fields else None


def ppid_of(fields: list[str]) -> int | None:
    """Field 4 of stat: the parent, for a process tree."""
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def start_time_of(fields: list[str]) -> int | None:
    """Field 22 of stat: when the process started; tells a reused PID from the process before."""
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def cpu_ticks_of(fields: list[str]) -> int | None:
    """utime + stime (fields 14 and 15 of stat)."""
    try:
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


def stat_cpu_ticks(text: str) -> int | None:
    return cpu_ticks_of(stat_fields(text))


def schedstat_wait_ns(text: str) -> int | None:
    """Second field of schedstat: time spent waiting on a run queue."""
    fields = text.split()
    return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else None


def parse_pressure(text: str) -> dict[str, float]:
    """`some avg10=… avg60=…` of /proc/pressure/cpu as ratios."""
    for line in text.splitlines():
        if line.startswith("some "):
            values = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            out = {}
            for window in ("avg10", "avg60"):
                try:
                    out[window] = float(values[window]) / 100.0
                except (KeyError, ValueError):
                    pass
            return out
    return {}


@dataclass(frozen=True)
class ProcessRow:
    """One process as one pass over /proc saw it."""

    pid: int
    ppid: int | None
    argv: list[str]
    start_time: int | None
    cpu_ticks: int | None


def process_table(procfs: ProcFS) -> dict[int, ProcessRow]:
    """Every visible process's row, reading each stat and cmdline once (the stat split once)."""
    table = {}
    for pid in procfs.pids():
        stat = procfs.read_text(f"{pid}/stat")
        argv = procfs.cmdline(pid)
        if stat is not None and argv is not None:
            fields = stat_fields(stat)
            table[pid] = ProcessRow(pid, ppid_of(fields), argv, start_time_of(fields), cpu_ticks_of(fields))
    return table


def descendants(root: int, processes: Mapping[int, ProcessRow], limit: int = 4096) -> list[int]:
    """`root` and every process below it in the table, at most `limit`."""
    children: dict[int, list[int]] = {}
    for row in processes.values():
        if row.ppid is not None:
            children.setdefault(row.ppid, []).append(row.pid)
    found: set[int] = set()
    stack = [root]
    while stack and len(found) < limit:
        pid = stack.pop()
        if pid in processes and pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return sorted(found)


def parse_status_uid(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isascii() and fields[1].isdigit():
                return int(fields[1])
    return None


def parse_socket_link(target: str) -> int | None:
    """The inode of an fd link to a socket (`socket:[12345]`); None for any other target."""
    if target.startswith("socket:[") and target.endswith("]"):
        digits = target[8:-1]
        if digits.isascii() and digits.isdigit():
            return int(digits)
    return None


def parse_gpu_uuid(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("GPU UUID:")]
