"""How much the agent grows an MPS daemon's control.log (issue 19), before and after on-change polling.

MPS writes every command it is sent to control.log and never rotates it. On the CPU machine the daemon is
the fake control program in scenario mode (tests/kit/fakecontrol.py), which appends every command it
receives to commands.log; each command is then costed in bytes as the real daemon writes it, from a real
H200 control.log (tests/fixtures/h200-driver580/session1-control.log, driver 580): four lines around it
(`Accepting connection...`, `NEW UI`, `Cmd:<command>`, `UI closed`) and one line per line of its reply,
each with the daemon's `[date time Control pid] ` prefix. Replies are the scenarios' (real H200 layouts).

Per client count (0: idle daemon, 2, 48 clients on one server), the agent (tests.kit.agentproc.Agent,
default settings, 2 s cycle) runs twice on the same daemon: `before` with mps_control.heartbeat_seconds = 0
(every cycle, as before issue 19) and `after` with the defaults (on change, a liveness query every 8 s, a
full query every 60 s). Its logs are readable (an empty control.log and server.log in --log-dir) and no
client comes or goes, so `after` is the steady cost of a quiet daemon.

    python -m benchmarks.control_log_growth [--seconds-before S] [--seconds-after S]
        # defaults 30 and 130 (two heartbeats); the figures are commands per hour and bytes per day
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from tests.kit.agentproc import Agent
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "h200-driver580" / "session1-control.log"
SCENARIOS = {0: "idle_daemon_driver580", 2: "healthy_two_clients_driver580", 48: "clients_48_driver580"}
_PREFIX = re.compile(r"^\[[^\]]*\] ")


def line_prefix_bytes() -> int:
    """Bytes of the `[date time Control pid] ` prefix of a real control.log line (the fixture's median)."""
    lengths = sorted(len(m.group(0).encode()) for line in FIXTURE.read_text().splitlines() if (m := _PREFIX.match(line)))
    return lengths[len(lengths) // 2]


def command_bytes(command: str, reply: str, prefix: int) -> int:
    """What one command adds to control.log: its four session lines and its reply's lines."""
    lines = ["Accepting connection...", "NEW UI", f"Cmd:{command}", *reply.splitlines(), "UI closed"]
    return sum(prefix + len(line.encode()) + 1 for line in lines)


def measure(clients: int, heartbeat: float | None, seconds: float, root: Path) -> dict[str, float]:
    daemon = FakeDaemon(root / f"{clients}-{heartbeat}", SCENARIOS[clients])
    log_dir = root / f"log-{clients}-{heartbeat}"
    log_dir.mkdir()
    for name in ("control.log", "server.log"):
        (log_dir / name).touch()
    env = {} if heartbeat is None else {"MPSWATCH_MPS_CONTROL_HEARTBEAT_SECONDS": str(heartbeat)}
    args = ["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", daemon.path, "--log-dir", str(log_dir)]
    try:
        with Agent(args, env=env, nvml="h200") as agent:
            agent.wait_for(lambda s: s.get(("mps_control_up", frozenset({("pipe_dir", daemon.path)}))) == 1, timeout=20)
            start, started = len(daemon.commands()), time.monotonic()
            time.sleep(seconds)
            sent = daemon.commands()[start:]
            elapsed = time.monotonic() - started
    finally:
        daemon.close()
    replies, prefix = daemon.scenario.get("replies", {}), line_prefix_bytes()
    written = sum(command_bytes(command, replies.get(command, ""), prefix) for command in sent)
    return {"commands_per_hour": len(sent) * 3600 / elapsed, "bytes_per_day": written * 86400 / elapsed,
            "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-before", type=float, default=30.0)
    parser.add_argument("--seconds-after", type=float, default=130.0)
    options = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="control-log-growth-") as tmp:
        for clients in SCENARIOS:
            before = measure(clients, 0, options.seconds_before, Path(tmp))
            after = measure(clients, None, options.seconds_after, Path(tmp))
            results[clients] = {"before": before, "after": after}
            print(f"{clients:>2} clients: before {before['commands_per_hour']:7.0f} commands/h "
                  f"{before['bytes_per_day'] / 1e6:7.2f} MB/day; after {after['commands_per_hour']:6.0f} commands/h "
                  f"{after['bytes_per_day'] / 1e6:6.2f} MB/day; ratio {before['bytes_per_day'] / after['bytes_per_day']:.1f}x",
                  flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
