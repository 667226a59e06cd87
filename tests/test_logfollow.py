"""Following real files: appends, partial lines, rotation, truncation, deletion, huge files, bad bytes."""

from __future__ import annotations

import os
import shutil
import tracemalloc

from mpswatch.logfollow import LogFollower


def append(path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def test_appended_lines_come_once_and_a_partial_line_waits_for_its_end(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"one\ntw")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["one"]
    assert follower.poll() == []
    append(log, b"o\nthree\n")
    assert follower.poll() == ["two", "three"]
    assert follower.stats.lines == 3


def test_backfill_reads_only_the_tail_and_drops_the_cut_line(tmp_path):
    log = tmp_path / "control.log"
    log.write_bytes(b"".join(b"line %04d\n" % i for i in range(1000)))  # 10 bytes a line
    follower = LogFollower(str(log), backfill_bytes=35)
    assert follower.poll() == ["line 0997", "line 0998", "line 0999"]


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path):
    log = tmp_path / "later" / "server.log"
    follower = LogFollower(str(log), backfill_bytes=4)
    assert follower.poll() == []
    log.parent.mkdir()  # a log dir made after the agent started: not an error
    assert follower.poll() == []
    assert sum(follower.stats.problems.values()) == 0
    log.write_bytes(b"first line\nsecond\n")
    assert follower.poll() == ["first line", "second"]
    follower.poll()
    assert sum(follower.stats.problems.values()) == 0  # its creation is no lost rotation


def test_rotation_by_rename_drains_the_old_file_then_follows_the_new(tmp_path):
    log = tmp_path / "control.log"
    log.write_bytes(b"a\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["a"]
    append(log, b"b\n")  # written after the last poll, before the rename
    os.rename(log, tmp_path / "control.log.1")
    log.write_bytes(b"c\n")
    assert follower.poll() == ["b", "c"]
    assert follower.stats.resets["rotated"] == 1


def test_copytruncate_starts_over_at_the_beginning(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"old line one\nold line two\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert len(follower.poll()) == 2
    with open(log, "r+b") as handle:
        handle.truncate(0)
    append(log, b"new\n")
    assert follower.poll() == ["new"]
    assert follower.stats.resets["truncated"] == 1


def test_deletion_then_recreation_is_followed(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"x\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["x"]
    append(log, b"y\n")
    log.unlink()
    assert follower.poll() == ["y"]
    assert follower.stats.resets["deleted"] == 1
    assert follower.poll() == []
    log.write_bytes(b"z\n")
    assert follower.poll() == ["z"]


def test_an_undecodable_line_is_kept_with_replacement_characters_and_counted(tmp_path):
    # a stray byte must not cost the event the rest of the line states (issue 17, finding 10)
    log = tmp_path / "server.log"
    log.write_bytes(b"good\n\xff\xfe bad\nafter\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["good", "\ufffd\ufffd bad", "after"]
    assert follower.stats.problems["undecodable"] == 1
    assert follower.stats.lines == 3


def test_overlong_lines_are_counted_and_skipped(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"good\n" + b"x" * 5000 + b"\nafter\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20, max_line_bytes=1024)
    assert follower.poll() == ["good", "after"]
    assert follower.stats.problems["line_too_long"] == 1


def test_an_overlong_line_split_across_polls_is_skipped_whole(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"y" * 3000)
    follower = LogFollower(str(log), backfill_bytes=1 << 20, max_line_bytes=1024)
    assert follower.poll() == []
    append(log, b"y" * 3000 + b"\nnext\n")
    assert follower.poll() == ["next"]
    assert follower.stats.problems["line_too_long"] == 1


def test_a_50_megabyte_log_is_read_in_bounded_memory(tmp_path):
    log = tmp_path / "control.log"
    line = b"[2026-11-29 18:36:58.212 Control   429] Cmd:get_server_list\n"
    block = line * 1000
    blocks = 50 * 1024 * 1024 // len(block) + 1
    with open(log, "wb") as handle:
        for _ in range(blocks):
            handle.write(block)
    follower = LogFollower(str(log), backfill_bytes=1 << 20, max_read_bytes=4 << 20)
    tracemalloc.start()
    try:
        assert 0 < len(follower.poll()) <= (1 << 20) // len(line) + 1  # backfill: 1 MiB of 50
        with open(log, "ab") as handle:  # another 50 MB arrive between two polls
            for _ in range(blocks):
                handle.write(block)
        polls = [len(follower.poll()) for _ in range(20)]
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(polls) == blocks * 1000  # every appended line, once
    assert max(polls) <= (4 << 20) // len(line) + 1  # one poll's budget at a time
    assert peak_bytes < 40 * 1024 * 1024  # never the whole file


def test_a_writer_that_keeps_its_renamed_file_is_still_read(tmp_path):
    # MPS never reopens its log: after logrotate's rename it writes on into the old file
    log = tmp_path / "control.log"
    log.write_bytes(b"a\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    writer = open(log, "ab", buffering=0)
    assert follower.poll() == ["a"]
    os.rename(log, tmp_path / "control.log.1")
    log.write_bytes(b"new file\n")
    assert follower.poll() == ["new file"]
    writer.write(b"late line in the renamed file\n")
    assert follower.poll() == ["late line in the renamed file"]
    writer.close()
    for _ in range(6):
        follower.poll()
    assert follower.stats.problems["unread_after_rotation"] == 0


def test_copytruncate_is_seen_even_when_the_file_grew_back_past_the_old_offset(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"[1] old line\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["[1] old line"]
    with open(log, "r+b") as handle:
        handle.truncate(0)
    append(log, b"[2] NEW1 longer than before\n[2] NEW2\n")
    assert follower.poll() == ["[2] NEW1 longer than before", "[2] NEW2"]
    assert follower.stats.resets["truncated"] == 1


def test_backfill_starting_exactly_on_a_line_boundary_keeps_that_line(tmp_path):
    log = tmp_path / "control.log"
    log.write_bytes(b"".join(b"line %04d\n" % i for i in range(1000)))  # 10 bytes a line
    follower = LogFollower(str(log), backfill_bytes=30)
    assert follower.poll() == ["line 0997", "line 0998", "line 0999"]
    assert follower.backfilling


def test_identity_is_taken_from_the_file_that_was_opened(tmp_path, monkeypatch):
    # a rotation between stat() and open() must not make the new file look new again next poll
    log = tmp_path / "server.log"
    log.write_bytes(b"A1\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    real_open = os.open

    def rotating_open(path, flags, *args):
        if str(path) == str(log):
            os.rename(log, tmp_path / "server.log.1")
            log.write_bytes(b"B1\nB2\n")
            monkeypatch.setattr(os, "open", real_open)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", rotating_open)
    first = follower.poll()
    second = follower.poll()
    assert first + second == ["B1", "B2"]


class RotatingWriter:
    """A logger that reopens its file after each rotation (logrotate's `create`), rotating every
    `every` lines: `numbered` shifts control.log.1 to .2 and so on, `overwrite` renames onto .1."""

    def __init__(self, path, every: int, scheme: str) -> None:
        self.path, self.every, self.scheme = path, every, scheme
        self.written = 0
        self.rotations = 0

    def line(self, text: str) -> None:
        if self.written and self.written % self.every == 0:
            self.rotate()
        append(self.path, text.encode() + b"\n")
        self.written += 1

    def rotate(self) -> None:
        directory, name = self.path.parent, self.path.name
        if self.scheme == "numbered":
            for number in range(self.rotations, 0, -1):
                os.rename(directory / f"{name}.{number}", directory / f"{name}.{number + 1}")
        os.rename(self.path, directory / f"{name}.1")
        self.path.write_bytes(b"")
        self.rotations += 1


def test_thirteen_numbered_rotations_between_two_polls_lose_no_line(tmp_path):
    # issue 17 finding 6: renaming every 150 lines lost every refusal and counted 1 rotation of 13
    log = tmp_path / "server.log"
    writer = RotatingWriter(log, every=150, scheme="numbered")
    writer.line("before the agent")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["before the agent"]
    expected = [f"line {i}" for i in range(1, 2000)]
    for text in expected:
        writer.line(text)
    assert writer.rotations == 13
    assert follower.poll() == expected
    assert follower.stats.resets["rotated"] == 13
    assert follower.stats.problems["rotation_lost"] == 0
    for _ in range(8):  # the rotated files go quiet and are let go, never read twice
        assert follower.poll() == []
    writer.line("after")
    assert follower.poll() == ["after"]
    writer.rotate()  # the files let go are still known: one more rotation reads only the new file
    writer.line("next")
    assert follower.poll() == ["next"]
    assert follower.stats.resets["rotated"] == 14


def test_rotations_whose_files_are_gone_are_counted_lost(tmp_path):
    # renamed onto the same .1 each time: only the last rotated file is still there to read
    log = tmp_path / "server.log"
    writer = RotatingWriter(log, every=150, scheme="overwrite")
    writer.line("before the agent")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["before the agent"]
    written = [f"line {i}" for i in range(1, 2000)]
    for text in written:
        writer.line(text)
    lines = follower.poll()
    # the first file to its end, then the one left at .1 (lines 1800-1949), then the current one
    assert lines == written[:149] + written[1799:]
    assert follower.stats.problems["rotation_lost"] == 11
    assert follower.stats.resets["rotated"] == 13


def test_rotated_files_there_before_the_agent_are_not_read(tmp_path):
    log = tmp_path / "control.log"
    (tmp_path / "control.log.1").write_bytes(b"yesterday\n")
    (tmp_path / "control.log.2.gz").write_bytes(b"\x1f\x8b compressed\n")
    log.write_bytes(b"today\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["today"]
    os.rename(tmp_path / "control.log.1", tmp_path / "control.log.2")
    os.rename(log, tmp_path / "control.log.1")
    log.write_bytes(b"new\n")
    assert follower.poll() == ["new"]
    assert follower.stats.resets["rotated"] == 1
    assert follower.stats.problems["rotation_lost"] == 0


def test_more_rotated_files_than_can_be_read_at_once_are_counted_lost(tmp_path):
    from mpswatch.logfollow import MAX_RETIRED_FILES

    log = tmp_path / "server.log"
    writer = RotatingWriter(log, every=1, scheme="numbered")
    writer.line("first")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["first"]
    rotations = MAX_RETIRED_FILES + 4
    for i in range(rotations):
        writer.line(f"line {i}")
    lines = follower.poll()
    assert lines[-MAX_RETIRED_FILES + 1:] == [f"line {i}" for i in range(rotations - MAX_RETIRED_FILES + 1, rotations)]
    assert follower.stats.resets["rotated"] == rotations
    assert follower.stats.problems["rotation_lost"] == rotations - len(lines)


def test_without_inotify_rotations_are_still_read_and_the_blind_spot_is_counted(tmp_path, monkeypatch):
    from mpswatch import logfollow

    def no_instance_left(directory, name):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(logfollow._Inotify.shared(), "watch", no_instance_left)
    log = tmp_path / "server.log"
    writer = RotatingWriter(log, every=2, scheme="numbered")
    writer.line("a")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["a"]
    for text in "bcdef":
        writer.line(text)
    assert follower.poll() == list("bcdef")
    assert follower.poll() == []
    assert follower.stats.problems["rotation_uncounted"] == 1
    assert follower.stats.resets["rotated"] == 2


def test_a_copytruncate_copy_is_history_not_a_rotation_to_read_again(tmp_path):
    # the H200 fault matrix's sequence: copytruncate to .1, then a rename to .2 (MPS writes on in .2)
    log = tmp_path / "server.log"
    log.write_bytes(b"[2026-11-29 19:23:34.372 Server   486] Client process 1 disconnected\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert len(follower.poll()) == 1
    append(log, b"[2026-11-29 19:23:35.000 Server   486] written just before the copy\n")
    shutil.copyfile(log, tmp_path / "server.log.1")
    os.truncate(log, 0)
    append(log, b"[2026-11-29 19:23:36.000 Server   486] after the truncation\n")
    # the line written between the last poll and the copy is read from the copy, once
    assert [line.split("] ", 1)[1] for line in follower.poll()] == ["written just before the copy", "after the truncation"]
    writer = open(log, "ab", buffering=0)
    os.rename(log, tmp_path / "server.log.2")
    writer.write(b"[2026-11-29 19:23:37.000 Server   486] in the renamed file\n")
    assert [line.split("] ", 1)[1] for line in follower.poll()] == ["in the renamed file"]
    writer.close()
    assert follower.stats.resets == {"rotated": 0, "truncated": 1, "deleted": 1}


def test_a_copy_left_by_logrotates_copy_mode_is_not_read_again_at_the_next_rotation(tmp_path):
    log = tmp_path / "control.log"
    log.write_bytes(b"[2026-11-29 19:23:34.372 Control   452] Accepting connection...\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert len(follower.poll()) == 1
    shutil.copyfile(log, tmp_path / "control.log-20261129")  # `copy`: the log itself is left as it is
    assert follower.poll() == []
    os.rename(log, tmp_path / "control.log.1")
    log.write_bytes(b"[2026-11-29 19:24:00.000 Control   452] NEW UI\n")
    assert [line.split("] ", 1)[1] for line in follower.poll()] == ["NEW UI"]


def test_a_renamed_file_mps_still_writes_to_is_read_however_long_it_was_quiet(tmp_path):
    # MPS never reopens its log: after logrotate's rename and `create`, the new file stays empty and
    # every later line goes to the renamed one, after a quiet time of any length
    log = tmp_path / "server.log"
    log.write_bytes(b"a\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    mps = open(log, "ab", buffering=0)
    assert follower.poll() == ["a"]
    os.rename(log, tmp_path / "server.log.1")
    log.write_bytes(b"")
    for _ in range(20):
        assert follower.poll() == []
    mps.write(b"a refusal after a quiet minute\n")
    assert follower.poll() == ["a refusal after a quiet minute"]
    mps.close()
    log.write_bytes(b"a restarted daemon writes here\n")  # the writer moved on: the old file can go
    assert follower.poll() == ["a restarted daemon writes here"]
    for _ in range(6):
        follower.poll()
    assert follower.stats.problems["unread_after_rotation"] == 0
    assert follower._retired == []


def test_only_the_logs_own_rotated_names_are_read_as_rotated(tmp_path):
    log = tmp_path / "server.log"
    log.write_bytes(b"a\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    assert follower.poll() == ["a"]
    (tmp_path / "server.logger").write_bytes(b"another program's log\n")
    (tmp_path / "control.log.1").write_bytes(b"the other log's\n")
    (tmp_path / "server.log.1.gz").write_bytes(b"\x1f\x8b compressed\n")
    os.symlink("/etc/hostname", tmp_path / "server.log.2")
    (tmp_path / "server.log-20261204").write_bytes(b"dated\n")
    os.rename(log, tmp_path / "server.log.1")
    log.write_bytes(b"b\n")
    assert follower.poll() == ["dated", "b"]


def test_rotated_names_beside_the_log_are_held_to_the_rules_of_the_log_itself(tmp_path):
    # a link or another user's file named like a rotated log is never read, as the log itself would not be
    secret = tmp_path / "secret"
    secret.write_text("not for the agent\n")
    log = tmp_path / "server.log"
    log.write_text("first\n")
    follower = LogFollower(str(log), backfill_bytes=1 << 20, owners=frozenset({os.getuid()}))
    assert follower.poll() == ["first"]
    (tmp_path / "server.log.3").symlink_to(secret)
    foreign = tmp_path / "server.log.2"
    foreign.write_text("another user's\n")
    if os.geteuid() == 0:
        os.chown(foreign, os.getuid() + 1, -1)
    log.rename(tmp_path / "server.log.1")
    log.write_text("second\n")
    lines = follower.poll()
    assert "not for the agent" not in lines and "second" in lines
    if os.geteuid() == 0:
        assert "another user's" not in lines
