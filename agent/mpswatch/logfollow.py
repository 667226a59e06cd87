"""Follows one log file across appends, rotation, truncation and deletion, in bounded memory.

MPS never reopens its logs: after a rename it keeps writing to the renamed file, so a rotated
file is still read for a while. Copytruncate is seen by the size shrinking or, when the file
grew back past the old offset between two polls, by its first bytes changing.
"""

from __future__ import annotations

import os
import stat as stat_module
from dataclasses import dataclass, field

DEFAULT_MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_READ_BYTES = 4 * 1024 * 1024  # per poll, so one huge write cannot stall a cycle
RETIRED_IDLE_POLLS = 5  # a renamed file is read until it has been quiet this many polls
_FINGERPRINT_BYTES = 64
PROBLEMS = ("line_too_long", "undecodable", "io_error", "partial_line_lost", "unread_after_rotation", "parse_error",
            "refused")
RESETS = ("rotated", "truncated", "deleted")


@dataclass
class FollowStats:
    """Counts by reason, for metrics; only ever grows. Known reasons start at 0."""

    problems: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    resets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESETS, 0))
    lines: int = 0

    def problem(self, reason: str) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1

    def reset(self, reason: str) -> None:
        self.resets[reason] = self.resets.get(reason, 0) + 1


class _OpenFile:
    """One open file: where we are in it, and the unfinished last line."""

    def __init__(self, fd: int, identity: tuple[int, int], offset: int, discarding: bool) -> None:
        self.fd = fd
        self.identity = identity
        self.offset = offset
        self.partial = bytearray()
        self.discarding = discarding  # inside a line that is cut (backfill start) or too long
        self.fingerprint = b""
        self.idle_polls = 0

    def close(self) -> None:
        os.close(self.fd)


class LogFollower:
    def __init__(
        self,
        path: str,
        backfill_bytes: int,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
        owners: frozenset[int] | None = None,
    ) -> None:
        """`owners`: the users whose files may be read here (None: any user's), for a file in a dir
        that a daemon's environment named: only what that daemon's user owns, and with one link."""
        self.path = path
        self.owners = owners
        self.refusal: str | None = None  # why the file at the path is not read; counted once per reason
        self.stats = FollowStats()
        self.generation = 0  # grows when the file is replaced or truncated: line context starts over
        self.backfilling = False  # the last poll read what was written before the agent started
        self._backfill = backfill_bytes
        self._max_line = max_line_bytes
        self._max_read = max_read_bytes
        self._current: _OpenFile | None = None
        self._retired: _OpenFile | None = None
        self._first_poll = True

    @property
    def is_open(self) -> bool:
        return self._current is not None

    def poll(self) -> list[str]:
        """Complete lines since the last poll. Never raises for file trouble: it is counted."""
        lines: list[str] = []
        first, self._first_poll = self._first_poll, False
        self.backfilling = False
        budget = self._max_read
        if self._retired is not None:
            budget -= self._read_retired(lines, budget)
        try:
            stat = os.lstat(self.path)  # the path itself: a link is never followed
        except FileNotFoundError:
            if self._current is not None:
                self._retire("deleted")
                budget -= self._read_retired(lines, budget)
            return lines
        except OSError:
            self.stats.problem("io_error")
            return lines
        if self._current is not None and (stat.st_dev, stat.st_ino) != self._current.identity:
            self._retire("rotated")
            budget -= self._read_retired(lines, budget)
        if self._current is None and not self._open(first):
            return lines
        current = self._current
        assert current is not None
        if self._truncated(current):
            self.stats.reset("truncated")
            self.generation += 1
            current.offset, current.discarding, current.fingerprint = 0, False, b""
            current.partial.clear()
        self.backfilling = first
        self._read(current, lines, max(budget, 0))
        return lines

    def close(self) -> None:
        for open_file in (self._current, self._retired):
            if open_file is not None:
                open_file.close()
        self._current = self._retired = None

    def _open(self, at_start: bool) -> bool:
        """Opens the path when it is a file this follower may read: a regular file (never a link, a
        device or a pipe: checked before opening, which has effects on some devices, and again on what
        was opened), owned as `owners` says."""
        try:
            refusal = self._refusal(os.lstat(self.path))
            if refusal is not None:
                return self._refuse(refusal)
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if not isinstance(err, FileNotFoundError):
                self.stats.problem("io_error")
            return False
        stat = os.fstat(fd)  # the file we opened, not whatever the path names by now
        refusal = self._refusal(stat)
        if refusal is not None:
            os.close(fd)
            return self._refuse(refusal)
        self.refusal = None
        offset, discarding = 0, False
        if at_start and stat.st_size > self._backfill:
            # start mid-file, after the next newline: the line we land in is cut
            offset = stat.st_size - self._backfill
            discarding = os.pread(fd, 1, offset - 1) != b"\n"
        self._current = _OpenFile(fd, (stat.st_dev, stat.st_ino), offset, discarding)
        if offset:
            self._current.fingerprint = os.pread(fd, min(_FINGERPRINT_BYTES, offset), 0)
        if not at_start:
            self.generation += 1
        return True

    def _refusal(self, stat: os.stat_result) -> str | None:
        if stat_module.S_ISLNK(stat.st_mode):
            return "a symbolic link (never followed)"
        if not stat_module.S_ISREG(stat.st_mode):
            return "not a regular file"
        if self.owners is not None:
            if stat.st_uid not in self.owners:
                return f"owned by uid {stat.st_uid}, not by the daemon's user (uid {', '.join(map(str, sorted(self.owners)))})"
            if stat.st_nlink > 1:
                return f"has {stat.st_nlink} hard links (another file's name)"
        return None

    def _refuse(self, refusal: str) -> bool:
        if refusal != self.refusal:
            self.stats.problem("refused")
            self.refusal = refusal
        return False

    def _truncated(self, current: _OpenFile) -> bool:
        try:
            size = os.fstat(current.fd).st_size
            if size < current.offset:
                return True
            if current.fingerprint:
                return os.pread(current.fd, len(current.fingerprint), 0) != current.fingerprint
        except OSError:
            self.stats.problem("io_error")
        return False

    def _retire(self, reason: str) -> None:
        self.stats.reset(reason)
        if self._retired is not None:  # a second rotation before the first went quiet
            self._drop_retired()
        self._retired, self._current = self._current, None

    def _read_retired(self, lines: list[str], budget: int) -> int:
        retired = self._retired
        assert retired is not None
        before = len(lines)
        used = self._read(retired, lines, max(budget, 0))
        retired.idle_polls = 0 if len(lines) > before else retired.idle_polls + 1
        if retired.idle_polls >= RETIRED_IDLE_POLLS:
            self._drop_retired()
        return used

    def _drop_retired(self) -> None:
        retired = self._retired
        assert retired is not None
        try:
            if os.fstat(retired.fd).st_size > retired.offset:
                self.stats.problem("unread_after_rotation")
        except OSError:
            pass
        if retired.partial and not retired.discarding:
            self.stats.problem("partial_line_lost")
        retired.close()
        self._retired = None

    def _read(self, open_file: _OpenFile, lines: list[str], budget: int) -> int:
        used = 0
        while used < budget:
            try:
                chunk = os.pread(open_file.fd, min(1 << 20, budget - used), open_file.offset)
            except OSError:
                self.stats.problem("io_error")
                break
            if not chunk:
                break
            if len(open_file.fingerprint) < _FINGERPRINT_BYTES and open_file.offset < _FINGERPRINT_BYTES:
                head = os.pread(open_file.fd, _FINGERPRINT_BYTES, 0)
                open_file.fingerprint = head[: max(len(open_file.fingerprint), open_file.offset + len(chunk))]
            open_file.offset += len(chunk)
            used += len(chunk)
            self._split(open_file, chunk, lines)
        return used

    def _split(self, open_file: _OpenFile, chunk: bytes, lines: list[str]) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                rest = chunk[start:]
                if not open_file.discarding:
                    if len(open_file.partial) + len(rest) > self._max_line:
                        self.stats.problem("line_too_long")
                        open_file.partial.clear()
                        open_file.discarding = True
                    else:
                        open_file.partial += rest
                return
            piece = chunk[start:end]
            start = end + 1
            if open_file.discarding:
                open_file.discarding = False
                continue
            if len(open_file.partial) + len(piece) > self._max_line:
                self.stats.problem("line_too_long")
                open_file.partial.clear()
                continue
            raw = bytes(open_file.partial) + piece if open_file.partial else piece
            open_file.partial.clear()
            try:
                lines.append(raw.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError:
                self.stats.problem("undecodable")
                continue
            self.stats.lines += 1
