"""Log output that fails or blocks costs log lines, counted, never the thread that logged."""

from __future__ import annotations

import fcntl
import os
import time

import structlog
from mpswatch.logsetup import configure_logging, flush_logs, lines_dropped

F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's capacity


def test_a_full_disk_drops_lines_and_counts_them():
    with open("/dev/full", "w") as full:
        configure_logging("info", "json", stream=full)
        structlog.get_logger().info("on_a_full_disk", n=1)
        structlog.get_logger().warning("on_a_full_disk", n=2)
    assert lines_dropped()["write_failed"] == 2


def test_a_pipe_nobody_reads_never_blocks_the_thread_that_logs():
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    os.write(write_end, b"x" * 4096)  # already full: a write would block
    stream = os.fdopen(write_end, "w")
    try:
        configure_logging("info", "json", stream=stream, background=True)
        log = structlog.get_logger()
        started = time.monotonic()
        for n in range(1500):
            log.info("into_a_full_pipe", n=n)
        assert time.monotonic() - started < 30  # returned at all: a blocking write never would
        assert lines_dropped()["backlog_full"] >= 400  # the writer holds one, the queue 1,000
    finally:
        os.close(read_end)  # the writer's blocked write fails now, and is counted
        deadline = time.monotonic() + 5
        while lines_dropped()["write_failed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines_dropped()["write_failed"] >= 1
        flush_logs(5.0)  # nothing left queued for a descriptor about to be closed (and reused)
        stream.close()
