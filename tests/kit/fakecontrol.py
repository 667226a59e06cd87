"""Stand-in for nvidia-cuda-mps-control: the one fake control program of the tests, the benchmarks
and the demo. `materialise(DIR)` writes it as DIR/nvidia-cuda-mps-control (tests.kit.fakedaemon's
FAKE_CONTROL is the session's copy), a shell front that reads the command line from stdin and
answers from $CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), one of two ways:

  replay:   a `replies/` dir: `cat` of replies/<command, spaces as underscores> (a few ms a call, as
            the real program costs; the benchmarks' daemons, see write_reply), or the real program's
            answer to an unknown command;
  scenario: otherwise, this script, run by the interpreter that materialised it with -I -S (no site
            packages, no pyenv shim: well under the agent's 1 s command deadline on a busy machine),
            answers from scenario.json.

Scenario keys: "mode" (answer | not_running | hang | garbage | crash), "replies" (command line ->
reply text), "hang_seconds", "delay_seconds" (a slow but live daemon), "spin_seconds" (busy-spins
that long before answering: a control program that stays runnable, as one starved of CPU on a
saturated node does), "grandchild_seconds" (leaves a grandchild sleeping that long with its stdout
open, then answers and exits; the real program never does). Every command received is
appended to commands.log beside it, so tests can prove what the agent sent. Unknown commands answer
as the real daemon does (exit 0).

Standard library only: the script runs without site packages.
"""

import json
import os
import shlex
import sys
import time

PROGRAM = "nvidia-cuda-mps-control"
FRONT = """#!/bin/sh
# nvidia-cuda-mps-control stand-in, written by tests/kit/fakecontrol.py (its docstring says how it answers)
IFS= read -r command
pipe_dir="${{CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}}"
if [ -d "$pipe_dir/replies" ]; then
    reply="$pipe_dir/replies/$(printf '%s' "$command" | tr ' ' '_')"
    if [ -f "$reply" ]; then cat "$reply"; else echo "Unknown command \\"$command\\""; fi
    exit 0
fi
exec {python} -I -S {script} "$command"
"""


def materialise(directory: str) -> str:
    """Writes the program into `directory` (made if need be) and returns its path; the write is
    atomic, so processes sharing the directory may all do it. (os.path, not pathlib: the script
    imports this module's top on every scenario answer.)"""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROGRAM)
    temporary = os.path.join(directory, f".{PROGRAM}.{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(FRONT.format(python=shlex.quote(sys.executable), script=shlex.quote(os.path.realpath(__file__))))
    os.chmod(temporary, 0o755)
    os.replace(temporary, path)
    return path


def write_reply(pipe_dir: "str | os.PathLike[str]", command: str, text: str) -> None:
    """Replay mode's answer to `command` in `pipe_dir` (which a replies/ dir turns to replay mode),
    replaced at once: a run of the program reads the old answer or the new one."""
    replies = os.path.join(pipe_dir, "replies")
    os.makedirs(replies, exist_ok=True)
    temporary = os.path.join(replies, f".{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, os.path.join(replies, command.replace(" ", "_")))


def _load(scenario_path: str) -> dict:
    try:
        with open(scenario_path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {"mode": "not_running"}


def answer(command: str) -> int:
    """The scenario mode's answer to one command line, written to stdout; returns the exit status."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    scenario_path = os.path.join(pipe_dir, "scenario.json")
    with open(os.path.join(pipe_dir, "commands.log"), "a") as log:
        log.write(command + "\n")
    scenario = _load(scenario_path)
    mode = scenario.get("mode", "answer")
    if mode == "hang":
        # like a SIGSTOPped daemon: block until the scenario changes or the hang ends
        deadline = time.monotonic() + scenario.get("hang_seconds", 3600)
        while time.monotonic() < deadline and _load(scenario_path).get("mode") == "hang":
            time.sleep(0.05)
        scenario = _load(scenario_path)
        mode = scenario.get("mode", "answer")
    if mode == "not_running":
        print("Cannot find MPS control daemon process")
        return 1
    if mode == "garbage":
        sys.stdout.write(scenario.get("garbage", "\x00\x07 segfault at 0 ip 00007f rsp sp error 4\n"))
        return 0
    if mode == "crash":
        sys.stdout.write("Segmentation fault\n")
        return 139
    time.sleep(scenario.get("delay_seconds", 0))
    spin_until = time.monotonic() + scenario.get("spin_seconds", 0)
    while time.monotonic() < spin_until:
        pass
    if scenario.get("grandchild_seconds") and os.fork() == 0:
        time.sleep(scenario["grandchild_seconds"])
        os._exit(0)
    replies = scenario.get("replies", {})
    if command in replies:
        sys.stdout.write(replies[command])
    else:
        print(f'Unknown command "{command.split()[0] if command else ""}"')
    return 0


if __name__ == "__main__":
    sys.exit(answer(sys.argv[1].strip()))
