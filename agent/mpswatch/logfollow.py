"""Follows one log file across appends, rotation, truncation and deletion, in bounded memory.

MPS never rotates its own logs; people do, with logrotate (rename or copytruncate) or by
deleting the file. Each poll returns the complete lines written since the last one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_READ_BYTES = 4 * 1024 * 1024  # per poll, so one huge write cannot stall a cycle


@dataclass
class FollowStats:
    """Counts by reason, for metrics; only ever grows."""

    # known reasons start at 0, so that the first problem is an increase Prometheus can see
    problems: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("line_too_long", "undecodable", "io_error", "partial_line_lost"), 0)
    )
    resets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("rotated", "truncated", "deleted"), 0))
    lines: int = 0

    def problem(self, reason: str) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1

    def reset(self, reason: str) -> None:
        self.resets[reason] = self.resets.get(reason, 0) + 1


class LogFollower:
    def __init__(
        self,
        path: str,
        backfill_bytes: int,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
    ) -> None:
        self.path = path
        self.stats = FollowStats()
        self._backfill = backfill_bytes
        self._max_line = max_line_bytes
        self._max_read = max_read_bytes
        self._file = None
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._partial = bytearray()
        self._discarding = False  # inside a line that grew past max_line_bytes
        self._first_open = True

    def poll(self) -> list[str]:
        """Complete lines since the last poll. Never raises for file trouble: it is counted."""
        lines: list[str] = []
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._first_open = False  # when it appears, all of it is new
            if self._file is not None:
                self._drain(lines)  # a renamed or deleted file may still hold its last lines
                self._close("deleted")
            return lines
        except OSError:
            self.stats.problem("io_error")
            return lines
        identity = (stat.st_dev, stat.st_ino)
        if self._file is not None and identity != self._identity:
            self._drain(lines)
            self._close("rotated")
        if self._file is None and not self._open(identity, stat.st_size):
            return lines
        if stat.st_size < self._offset:
            self.stats.reset("truncated")
            self._offset = 0
            self._partial.clear()
            self._discarding = False
        self._read(lines, self._max_read)
        return lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, identity: tuple[int, int], size: int) -> bool:
        try:
            self._file = open(self.path, "rb", buffering=0)
        except OSError:
            self.stats.problem("io_error")
            return False
        self._identity = identity
        self._offset = 0
        self._partial.clear()
        self._discarding = False
        if self._first_open and size > self._backfill:
            # start mid-file: the first, cut line is not a line
            self._offset = size - self._backfill
            self._discarding = True
        self._first_open = False
        return True

    def _close(self, reason: str) -> None:
        self.stats.reset(reason)
        self.close()
        self._identity = None
        if self._partial and not self._discarding:
            self.stats.problem("partial_line_lost")
        self._partial.clear()
        self._discarding = False

    def _drain(self, lines: list[str]) -> None:
        self._read(lines, self._max_read)

    def _read(self, lines: list[str], budget: int) -> None:
        assert self._file is not None
        while budget > 0:
            try:
                chunk = os.pread(self._file.fileno(), min(1 << 20, budget), self._offset)
            except OSError:
                self.stats.problem("io_error")
                return
            if not chunk:
                return
            self._offset += len(chunk)
            budget -= len(chunk)
            self._split(chunk, lines)

    def _split(self, chunk: bytes, lines: list[str]) -> None:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                rest = chunk[start:]
                if not self._discarding:
                    if len(self._partial) + len(rest) > self._max_line:
                        self.stats.problem("line_too_long")
                        self._partial.clear()
                        self._discarding = True
                    else:
                        self._partial += rest
                return
            piece = chunk[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False
                continue
            if len(self._partial) + len(piece) > self._max_line:
                self.stats.problem("line_too_long")
                self._partial.clear()
                continue
            raw = bytes(self._partial) + piece if self._partial else piece
            self._partial.clear()
            try:
                lines.append(raw.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError:
                self.stats.problem("undecodable")
                continue
            self.stats.lines += 1
