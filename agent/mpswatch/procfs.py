"""Reads of /proc under an injectable root, so tests and containers can point it elsewhere.

Every reader returns None when the process is gone or unreadable: processes come and
go between a listing and a read, and that is never an error for the agent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


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
    ) -> tuple[list[dict[str, str]], list[int]]:
        """Environments of the running `program`s, and the PIDs whose environment is unreadable."""
        environments, unreadable = [], []
        for pid in self.pids_running(program, accept):
            try:
                env = self.environ(pid)
            except PermissionError:
                unreadable.append(pid)
                continue
            if env is not None:
                environments.append(env)
        return environments, unreadable

    def read_text(self, relative: str, limit: int = 1 << 20) -> str | None:
        """A small /proc file (relative to the root), or None when it is gone or unreadable."""
        try:
            return read_file(f"{self._prefix}/{relative}", limit).decode("utf-8", "replace")
        except OSError:
            return None

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


def parse_stat_state(text: str) -> str | None:
    """The state letter; comm may hold spaces and parentheses, so split after the last ')'."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    return fields[0] if sep and fields else None


def parse_status_uid(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isascii() and fields[1].isdigit():
                return int(fields[1])
    return None


def parse_gpu_uuid(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("GPU UUID:")]
