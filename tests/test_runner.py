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


def test_a_grandchild_holding_the_output_does_not_hold_the_reader(tmp_path):
    """Finding 15 of issue 17: the child answers and exits, its background grandchild keeps stdout open."""
    pid_file = tmp_path / "grandchild.pid"
    result = run_with_deadline(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo 476"], b"", os.environ, 5.0)
    assert not result.timed_out and (result.returncode, result.output) == (0, "476\n")
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)  # killed with the child's process group


def test_everything_written_before_the_exit_is_read_though_a_descendant_keeps_the_pipe():
    result = run_with_deadline(
        [sys.executable, "-I", "-S", "-c",
         "import os, sys, time\nif os.fork() == 0:\n    time.sleep(30)\nelse:\n    sys.stdout.write('x' * 300000)"],
        b"", os.environ, 5.0)
    assert not result.timed_out and result.output == "x" * 300000


def test_a_child_starved_of_cpu_at_its_deadline_gets_it_once_more():
    """Busy nodes must not page (issue 17): a child still runnable at its deadline (here spinning until
    1.2 s after launch, as a control program starting on a saturated node) is not a hang."""
    until = time.time() + 1.2
    result = run_with_deadline(
        [sys.executable, "-I", "-S", "-c", f"import time\nwhile time.time() < {until}: pass\nprint(476)"],
        b"", os.environ, 1.0)
    assert not result.timed_out and result.output == "476\n"
    assert result.grace_seconds == 1.0 and "state R" in result.starved_detail


def test_a_child_blocked_waiting_at_its_deadline_gets_no_more_time():
    started = time.monotonic()
    result = run_with_deadline(["sleep", "30"], b"", os.environ, 1.0)
    assert result.timed_out and result.grace_seconds == 0.0
    assert time.monotonic() - started < 3.0  # a hung daemon is still seen within 3 s


def test_a_stopped_child_gets_no_more_time():
    result = run_with_deadline([sys.executable, "-I", "-S", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"],
                               b"", os.environ, 1.0)
    assert result.timed_out and result.grace_seconds == 0.0


def test_a_child_spinning_past_its_extended_deadline_times_out():
    result = run_with_deadline([sys.executable, "-I", "-S", "-c", "while True: pass"], b"", os.environ, 0.5)
    assert result.timed_out and result.grace_seconds == 0.5


def test_a_starved_child_gets_no_second_deadline_when_waiting_cannot_help():
    result = run_with_deadline([sys.executable, "-I", "-S", "-c", "while True: pass"], b"", os.environ, 0.5,
                               give_up=lambda: True)
    assert result.timed_out and result.grace_seconds == 0.0


def test_without_pidfds_the_child_s_exit_is_polled(monkeypatch, tmp_path):
    """Kernels before 5.3 (or a seccomp filter) refuse pidfd_open: the reader polls the exit instead."""

    def refused(pid):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", refused)
    result = run_with_deadline(["sh", "-c", "sleep 60 & echo 476"], b"", os.environ, 5.0)
    assert not result.timed_out and (result.returncode, result.output) == (0, "476\n")
    assert run_with_deadline(["sh", "-c", "cat; exit 3"], b"ps\n", os.environ, 5.0).output == "ps\n"
