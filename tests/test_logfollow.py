"""Following real files: appends, partial lines, rotation, truncation, deletion, huge files, bad bytes."""

from __future__ import annotations

import os
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
    log = tmp_path / "server.log"
    follower = LogFollower(str(log), backfill_bytes=4)
    assert follower.poll() == []
    log.write_bytes(b"first line\nsecond\n")
    assert follower.poll() == ["first line", "second"]


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
