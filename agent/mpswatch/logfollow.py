"""Follows one log file across appends, rotation, truncation and deletion, in bounded memory.

MPS never reopens its logs: after a rename it keeps writing to the renamed file, so a rotated
file is still read for a while. Copytruncate is seen by the size shrinking or, when the file
grew back past the old offset between two polls, by its first bytes changing.

Several rotations can happen between two polls. The files they left that are still there under a
rotated name (`control.log.1`, `control.log-20261204`, not compressed ones) are found beside the
log and read from their start; an inotify watch on the directory counts how many files took the
log's name, so the ones that were gone before a poll could read them are counted as lost.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat as stat_kind
import struct
import threading
from collections import deque
from dataclasses import dataclass, field

DEFAULT_MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_READ_BYTES = 4 * 1024 * 1024  # per poll, so one huge write cannot stall a cycle
RETIRED_IDLE_POLLS = 5  # a renamed file is read until it has been quiet this many polls, and its writer moved on
MAX_RETIRED_FILES = 16  # rotated files read at once (open fds); more between two polls: the oldest are lost
MAX_SIBLINGS_SCANNED = 256  # names beside the log looked at for rotated files, per scan
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z", ".zip")  # rotated, but not readable as text
_FINGERPRINT_BYTES = 64
_SAME_HEAD_BYTES = 48
_READ_HEADS_KEPT = 64
PROBLEMS = (
    "line_too_long",
    "undecodable",
    "io_error",
    "partial_line_lost",
    "unread_after_rotation",
    "parse_error",
    "rotation_lost",
    "rotation_uncounted",
    "refused",
)
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


def _same_file(head: bytes, known_head: bytes) -> bool:
    """A reused inode number is another file: the first bytes (log times) tell them apart."""
    return head[: len(known_head)] == known_head


def _same_content(head: bytes, read_head: bytes) -> bool:
    """Whether a file begins as one already read (a copy: logrotate's `copy`, `copytruncate`). A log
    line's time and writer fill its first 40 bytes: fewer than _SAME_HEAD_BYTES in common prove nothing."""
    shorter, longer = sorted((head, read_head), key=len)
    return len(shorter) >= _SAME_HEAD_BYTES and longer.startswith(shorter)


_IN_MOVED_TO, _IN_CREATE, _IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR = 0x80, 0x100, 0x4000, 0x8000, 0x01000000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len, then the name


class _NameWatch:
    """How many files took one name in a directory (created there or renamed onto it), so that
    rotations between two polls are known even when their files are gone."""

    def __init__(self, wd: int, name: bytes) -> None:
        self.wd, self.name = wd, name
        self.appeared = 0
        self.broken = False  # the count is incomplete from here on (queue overflow, directory gone)

    def drain(self) -> None:
        _Inotify.shared().drain()

    def close(self) -> None:
        _Inotify.shared().release(self)


class _Inotify:
    """One inotify instance for the whole process (instances are few: 128 a user by default), one
    watch a directory, its events handed to the name watches."""

    _instance: _Inotify | None = None
    _creating = threading.Lock()

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(self._libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "no inotify in this C library")
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd = fd
        self._lock = threading.Lock()
        self._names: dict[int, list[_NameWatch]] = {}  # wd -> the name watches in that directory

    @classmethod
    def shared(cls) -> _Inotify:
        with cls._creating:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def watch(self, directory: str, name: str) -> _NameWatch:
        with self._lock:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR)
            if wd < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), directory)
            name_watch = _NameWatch(wd, os.fsencode(name))
            self._names.setdefault(wd, []).append(name_watch)
            return name_watch

    def release(self, name_watch: _NameWatch) -> None:
        with self._lock:
            watchers = self._names.get(name_watch.wd, [])
            if name_watch in watchers:
                watchers.remove(name_watch)
                if not watchers:
                    del self._names[name_watch.wd]
                    self._libc.inotify_rm_watch(self._fd, name_watch.wd)  # fails harmlessly if already gone

    def drain(self) -> None:
        with self._lock:
            while True:
                try:
                    data = os.read(self._fd, 64 * 1024)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:  # unreadable: no count can be trusted any more
                    self._break(list(self._names))
                    return
                self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        at = 0
        while at + _EVENT_HEADER.size <= len(data):
            wd, mask, _, length = _EVENT_HEADER.unpack_from(data, at)
            name = data[at + _EVENT_HEADER.size : at + _EVENT_HEADER.size + length].rstrip(b"\0")
            at += _EVENT_HEADER.size + length
            if mask & _IN_Q_OVERFLOW:
                self._break(list(self._names))
            elif mask & _IN_IGNORED:  # the directory went (or the watch was removed)
                self._break([wd])
            elif mask & (_IN_CREATE | _IN_MOVED_TO):
                for name_watch in self._names.get(wd, []):
                    if name_watch.name == name:
                        name_watch.appeared += 1

    def _break(self, wds: list[int]) -> None:
        for wd in wds:
            for name_watch in self._names.get(wd, []):
                name_watch.broken = True


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
        self._retired: list[_OpenFile] = []  # renamed or deleted files still read, oldest first
        self._first_poll = True
        self._directory, self._name = os.path.split(path)
        # rotated files beside the log already read, or there before the agent: (dev, ino) -> first bytes
        self._known: dict[tuple[int, int], bytes] = {}
        self._read_heads: deque[bytes] = deque(maxlen=_READ_HEADS_KEPT)  # files read, for telling copies
        self._watch: _NameWatch | None = None
        self._watch_failed = False
        self._files_taken = 0  # files that took the name since the watch started and were read
        self._lost_counted = 0

    @property
    def is_open(self) -> bool:
        return self._current is not None

    def poll(self) -> list[str]:
        """Complete lines since the last poll. Never raises for file trouble: it is counted."""
        lines: list[str] = []
        first, self._first_poll = self._first_poll, False
        self.backfilling = False
        if first:  # rotated files there before the agent are not read: like the log's head, they are history
            self._known = {identity: head for identity, head, _ in self._siblings(keep_open=False)}
        if self._watch is not None:
            self._watch.drain()
        self._poll_files(lines, first)
        self._count_lost_rotations()
        return lines

    def _poll_files(self, lines: list[str], first: bool) -> None:
        budget = self._max_read - self._read_retired(lines, self._max_read, list(self._retired))
        try:
            stat = os.lstat(self.path)  # the path itself: a link is never followed
        except FileNotFoundError:
            if self._current is not None:
                budget -= self._read_retired(lines, budget, self._retire("deleted"))
            return
        except OSError:
            self.stats.problem("io_error")
            return
        if self._current is not None and (stat.st_dev, stat.st_ino) != self._current.identity:
            budget -= self._read_retired(lines, budget, self._retire("rotated"))
        if self._current is None and not self._open(first):
            return
        current = self._current
        assert current is not None
        if self._truncated(current):
            self.stats.reset("truncated")
            budget -= self._read_retired(lines, budget, self._take_up_copy(current))
            self.generation += 1
            current.offset, current.discarding, current.fingerprint = 0, False, b""
            current.partial.clear()
        self.backfilling = first
        self._read(current, lines, max(budget, 0))

    def close(self) -> None:
        for open_file in [self._current, *self._retired]:
            if open_file is not None:
                open_file.close()
        self._current, self._retired = None, []
        if self._watch is not None:
            self._watch.close()
            self._watch = None

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
            self._files_taken += 1
        return True

    def _refusal(self, stat: os.stat_result) -> str | None:
        if stat_kind.S_ISLNK(stat.st_mode):
            return "a symbolic link (never followed)"
        if not stat_kind.S_ISREG(stat.st_mode):
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

    def _count_lost_rotations(self) -> None:
        """Files that took the log's name but were never read: gone before a poll could read them
        (rotated on and deleted, or over MAX_RETIRED_FILES). A lower bound: the watch starts at the
        end of a poll, and a rotation between that poll's reads and the watch's start is not seen."""
        watch = self._watch
        if watch is not None and watch.broken:  # overflowed or the directory went: start afresh
            watch.close()
            self._watch = None
            self.stats.problem("rotation_uncounted")
        if watch is None or watch.broken:
            try:
                self._watch = _Inotify.shared().watch(self._directory or ".", self._name)
                self._files_taken = self._lost_counted = 0
            except OSError as err:  # tried again next poll; a limit (inotify instances, watches) counted once
                if err.errno not in (errno.ENOENT, errno.ENOTDIR) and not self._watch_failed:
                    self.stats.problem("rotation_uncounted")
                    self._watch_failed = True
            return
        lost = watch.appeared - self._files_taken
        for _ in range(lost - self._lost_counted):
            self.stats.problem("rotation_lost")
            self.stats.reset("rotated")
        self._lost_counted = max(lost, self._lost_counted)

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

    def _take_up_copy(self, truncated: _OpenFile) -> list[_OpenFile]:
        """After copytruncate, what was written between the last poll and the copy is only in the
        copy: carry on reading there, from where the truncated file was left (at most one file)."""
        self._read_heads.append(truncated.fingerprint)
        copy: _OpenFile | None = None
        for identity, head, fd in self._siblings():
            if copy is None and identity not in self._known and _same_content(head, truncated.fingerprint):
                copy = _OpenFile(fd, identity, truncated.offset, truncated.discarding)
                copy.partial, copy.fingerprint = bytearray(truncated.partial), truncated.fingerprint
            else:
                os.close(fd)
            self._known.setdefault(identity, head)
        if copy is None:
            return []
        self._add_retired(copy)
        return [copy]

    def _retire(self, reason: str) -> list[_OpenFile]:
        """Lets the current file go, and takes up the rotated files no poll has read yet: returns
        what is to be read now, oldest first."""
        current = self._current
        assert current is not None
        self.stats.reset(reason)
        self._current = None
        unread = self._unread_rotated_files(current)
        room = max(MAX_RETIRED_FILES - len(self._retired) - 1, 0)
        too_many = len(unread) - room
        for skipped in unread[: max(too_many, 0)]:  # the oldest: counted lost, never read
            self.stats.problem("rotation_lost")
            self.stats.reset("rotated")
            skipped.close()  # known now: never read later either
        taken = [current, *unread[max(too_many, 0):]]
        for open_file in taken:
            if open_file is not current:
                self.stats.reset("rotated")
                self.generation += 1
            self._add_retired(open_file)
        self._files_taken += len(unread)
        return taken

    def _add_retired(self, open_file: _OpenFile) -> None:
        self._retired.append(open_file)
        while len(self._retired) > MAX_RETIRED_FILES:  # more rotations than files read at once
            self._drop_retired(self._retired[0])

    def _siblings(self, keep_open: bool = True) -> list[tuple[tuple[int, int], bytes, int]]:
        """Rotated files beside the log, as (identity, first bytes, open fd or -1), oldest first.
        Only regular files named after the log and not compressed; links are not followed."""
        found: list[tuple[tuple[int, int, str], tuple[int, int], bytes, int]] = []
        try:
            with os.scandir(self._directory or ".") as entries:
                for count, entry in enumerate(entries):
                    if count >= MAX_SIBLINGS_SCANNED:
                        break
                    name = entry.name
                    after_name = name[len(self._name) : len(self._name) + 1] if name.startswith(self._name) else ""
                    if after_name not in (".", "-", "_") or name.endswith(COMPRESSED_SUFFIXES):
                        continue  # not the log's rotated name (`server.log.1`, `server.log-20261204`)
                    try:  # as the log itself: checked before opening (a device's open has effects) and after
                        if self._refusal(entry.stat(follow_symlinks=False)) is not None:
                            continue
                        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except OSError:
                        continue
                    try:
                        stat = os.fstat(fd)
                        head = os.pread(fd, _FINGERPRINT_BYTES, 0) if self._refusal(stat) is None else None
                    except OSError:
                        head = None
                    if head is None or not keep_open:
                        os.close(fd)
                        fd = -1
                    if head is not None:
                        found.append((self._age_order(stat.st_mtime_ns, name), (stat.st_dev, stat.st_ino), head, fd))
        except (FileNotFoundError, NotADirectoryError):
            pass  # no directory (yet): nothing rotated
        except OSError:
            self.stats.problem("io_error")
        found.sort(key=lambda row: row[0])
        return [(identity, head, fd) for _, identity, head, fd in found]

    def _age_order(self, mtime_ns: int, name: str) -> tuple[int, int, str]:
        """Oldest first: by time written, then (files rotated within one clock tick) `.2` before
        `.1`, then dated names in order."""
        suffix = name[len(self._name) :].lstrip(".-_")
        return mtime_ns, -int(suffix) if suffix.isascii() and suffix.isdigit() and len(suffix) <= 9 else 0, name

    def _unread_rotated_files(self, retiring: _OpenFile) -> list[_OpenFile]:
        """Files rotated between two polls that no poll read: beside the log, not already known."""
        held = {open_file.identity for open_file in (retiring, *self._retired)}
        read_heads = [retiring.fingerprint, *(open_file.fingerprint for open_file in self._retired), *self._read_heads]
        unread: list[_OpenFile] = []
        known: dict[tuple[int, int], bytes] = {}
        for identity, head, fd in self._siblings():
            if (
                identity in held
                or (identity in self._known and _same_file(head, self._known[identity]))
                or any(_same_content(head, read_head) for read_head in read_heads)
            ):
                known[identity] = self._known.get(identity, head)
                os.close(fd)
                continue
            known[identity] = head
            unread.append(_OpenFile(fd, identity, 0, False))
        self._known = known  # only what is still there: a deleted file's number may be reused
        return unread

    def _read_retired(self, lines: list[str], budget: int, retired_files: list[_OpenFile]) -> int:
        used = 0
        for retired in retired_files:
            before = len(lines)
            used += self._read(retired, lines, max(budget - used, 0))
            try:
                at_end = os.fstat(retired.fd).st_size <= retired.offset
            except OSError:
                at_end = True
            retired.idle_polls = 0 if len(lines) > before or not at_end else retired.idle_polls + 1
            if retired.idle_polls >= RETIRED_IDLE_POLLS and not self._may_still_be_written(retired):
                self._drop_retired(retired)
        return used

    def _may_still_be_written(self, retired: _OpenFile) -> bool:
        """MPS never reopens its log: the file it writes stays the last one renamed for as long as
        the log's new file (if any) is empty, however long it is quiet."""
        newest = self._retired[-1] if self._retired else None
        return retired is newest and (self._current is None or self._current.offset == 0)

    def _drop_retired(self, retired: _OpenFile) -> None:
        try:
            if os.fstat(retired.fd).st_size > retired.offset:
                self.stats.problem("unread_after_rotation")
        except OSError:
            pass
        if retired.partial and not retired.discarding:
            self.stats.problem("partial_line_lost")
        self._known[retired.identity] = retired.fingerprint
        self._read_heads.append(retired.fingerprint)
        retired.close()
        self._retired.remove(retired)

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
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # a stray byte must not cost the event the rest of the line states: keep it, marked
                self.stats.problem("undecodable")
                text = raw.decode("utf-8", errors="replace")
            lines.append(text.rstrip("\r"))
            self.stats.lines += 1
