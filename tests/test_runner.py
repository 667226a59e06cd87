"""The child runner: deadline, process-group kill, bounded output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mpswatch.runner import run_with_deadline

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_child_past_its_deadline_is_killed_with_its_whole_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    result = run_with_deadline(
        ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], b"", os.environ, 0.5
    )
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - started < 3.0
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_output_past_the_cap_is_cut_and_the_child_killed():
    result = run_with_deadline(["sh", "-c", "yes"], b"", os.environ, 5.0, max_output_bytes=4096)
    assert result.truncated and len(result.output) == 4096


def test_stdin_reaches_the_child_and_its_exit_code_comes_back():
    result = run_with_deadline(["sh", "-c", "read line; echo got $line; exit 3"], b"ps\n", os.environ, 5.0)
    assert (result.returncode, result.output) == (3, "got ps\n")


def test_a_program_that_does_not_exist_is_an_exec_error_not_an_exception():
    result = run_with_deadline(["/nonexistent/nvidia-cuda-mps-control"], b"", os.environ, 1.0)
    assert result.exec_error and "nvidia-cuda-mps-control" in result.exec_error


def test_a_very_long_deadline_is_accepted():
    result = run_with_deadline(["sh", "-c", "echo ok"], b"", os.environ, 1e9)
    assert (result.returncode, result.output) == (0, "ok\n")


def test_stderr_is_kept_apart_from_the_answer():
    result = run_with_deadline(["sh", "-c", "echo warning >&2; echo 476"], b"", os.environ, 5.0)
    assert (result.output, result.errors) == ("476\n", "warning\n")


KEEPS_STARTING_CHILDREN = """
import os, sys, threading, time
from mpswatch.runner import kill_all_children, run_with_deadline

pids = sys.argv[1]

def keep_running():
    while True:
        run_with_deadline(["sh", "-c", f"echo $$ >> {pids}; exec sleep 60"], b"", os.environ, 60.0)

for _ in range(4):
    threading.Thread(target=keep_running, daemon=True).start()
time.sleep(1.0)
kill_all_children()
time.sleep(1.0)  # the threads whose children were killed try again
"""


def test_no_child_outlives_kill_all_children_even_one_started_while_it_ran(tmp_path):
    """Collector threads keep starting children while the agent stops: those killed return, and
    their threads must not start new ones that would outlive the agent."""
    pids = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "agent"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", KEEPS_STARTING_CHILDREN, str(pids)], env=env, timeout=30, check=True)
    started = [int(pid) for pid in pids.read_text().split()]
    try:
        assert len(started) >= 4
        survivors = [pid for pid in started if _alive(pid)]
        assert survivors == [], f"{len(survivors)} of {len(started)} children outlived kill_all_children"
    finally:
        for pid in started:
            if _alive(pid):
                os.kill(pid, 9)
