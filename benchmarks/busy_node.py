"""Busy nodes must not page (issue 17): a real MPS control daemon, every core saturated with busy
loops, the agent at its defaults (2 s interval, 1 s command timeout) scraped every 2 s as Prometheus
would. Counts the scrapes that say the healthy daemon is down (`mps_control_up 0`, `state="timeout"`,
no series) or the collector failed; then, with the cores still saturated, SIGSTOPs the daemon three
times and times how long until `mps_control_up 0` (state `timeout`; passes at 3 s, one interval plus
one command timeout, and 0.1 s of polling), and SIGCONT until it is up again. Writes one JSON result.

    python3 -m benchmarks.busy_node --seconds 540 --out busy-node.json    (on the GPU machine)

--seconds (or MPSWATCH_BUSY_NODE_SECONDS, default 600) is how long the cores are saturated, the
SIGSTOP phase included (its last ~25 s: three SIGSTOPs, each timed); about 15 s more go to start and
stop (and nvcc with --client). --out (or
MPSWATCH_BUSY_NODE_OUT) is rewritten every 30 s with the figures so far ("partial": true), so a run
killed from outside keeps them. --loops (default os.cpu_count()) busy loops; --fake runs it against
the fake control program (tests/kit/fakecontrol.py) instead of a real daemon: a check of the harness
on a machine without a GPU, not a result. With nvcc and --client the daemon also serves one client
(tests/gpu/mps_client.cu, held for the run), so that every command the agent sends is answered.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kit.agentproc import Agent, key

HERE = Path(__file__).resolve().parent
SCRAPE_EVERY = 2.0
STOP_PHASE_SECONDS = 25.0
STOP_TRIALS = 3


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-I", "-S", "-c", "while True: pass"]) for _ in range(count)]


def cpu_pressure() -> str | None:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


class Tally:
    """What the scrapes said about a daemon that is healthy throughout."""

    def __init__(self, pipe: str) -> None:
        self.pipe = pipe
        self.figures: dict = {"scrapes": 0, "scrape_failed": 0, "false_up_0": 0, "false_timeout_state": 0,
                              "no_up_series": 0, "collector_failed": 0, "slowest_scrape_seconds": 0.0,
                              "max_command_seconds": 0.0, "max_probes_deferred": 0, "max_data_age_seconds": 0.0,
                              "first_false": None}

    def scrape(self, agent: Agent, started: float) -> None:
        f = self.figures
        t0 = time.monotonic()
        try:
            samples = agent.scrape()
        except (OSError, AssertionError):
            f["scrape_failed"] += 1
            return
        now = time.time()
        f["scrapes"] += 1
        f["slowest_scrape_seconds"] = max(f["slowest_scrape_seconds"], round(time.monotonic() - t0, 4))
        up = samples.get(key("mps_control_up", pipe_dir=self.pipe))
        timeout = samples.get(key("mps_control_state", pipe_dir=self.pipe, state="timeout"))
        false = None
        if up is None:
            f["no_up_series"] += 1
            false = "no mps_control_up series"
        elif up == 0:
            f["false_up_0"] += 1
            false = "mps_control_up 0"
        if timeout == 1:
            f["false_timeout_state"] += 1
            false = "state timeout"
        if samples.get(key("mps_exporter_collector_success", collector="mps_control")) == 0:
            f["collector_failed"] += 1
            false = false or "collector failed"
        if false and f["first_false"] is None:
            f["first_false"] = {"after_seconds": round(time.monotonic() - started, 1), "what": false}
        for (name, labels), value in samples.items():
            if name == "mps_control_command_duration_seconds" and dict(labels).get("pipe_dir") == self.pipe:
                f["max_command_seconds"] = max(f["max_command_seconds"], round(value, 4))
        f["max_probes_deferred"] = max(f["max_probes_deferred"], samples.get(key("mps_control_probes_deferred"), 0))
        measured = samples.get(key("mps_control_probe_timestamp_seconds", pipe_dir=self.pipe))
        if measured is not None:
            f["max_data_age_seconds"] = max(f["max_data_age_seconds"], round(now - measured, 3))
        f["commands_starved_total"] = samples.get(key("mps_control_commands_starved_total", pipe_dir=self.pipe))


def time_until(agent: Agent, predicate, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate(agent.scrape()):
                return round(time.monotonic() - started, 3)
        except (OSError, AssertionError):
            pass
        time.sleep(0.1)
    return None


def run(seconds: float, loops: int, out: Path, fake: bool, client: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mpswatch-busy-node-"))
    result: dict = {"seconds": seconds, "loops": loops, "cpus": os.cpu_count(), "fake": fake,
                    "scrape_every_seconds": SCRAPE_EVERY, "agent": "defaults: interval 2 s, command timeout 1 s"}
    daemon = holder = None
    spinning: list[subprocess.Popen] = []
    try:
        if fake:
            from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon

            daemon = FakeDaemon(root, "healthy_two_clients_driver580")
            pipe, daemon_pid, extra = daemon.path, daemon.process.pid, ["--mps-control-bin", FAKE_CONTROL]
        else:
            from tests.kit.realmps import MpsDaemon

            daemon = MpsDaemon(root / "mps")
            daemon_pid, pipe, extra = daemon.start(), str(daemon.pipe_dir), []
            if client and shutil.which("nvcc"):
                binary = str(root / "mps_client")
                subprocess.run(["nvcc", "-O2", "-o", binary, str(HERE.parent / "tests/gpu/mps_client.cu")],
                               check=True, timeout=300)
                env = {k: v for k, v in daemon.env.items() if k != "CUDA_VISIBLE_DEVICES"}
                holder = subprocess.Popen([binary, "hold", str(seconds + 60)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result["daemon"] = {"pipe_dir": pipe, "pid": daemon_pid, "client": holder is not None}
        with Agent(["--pipe-dir", pipe, *extra], log_path=root / "agent.log") as agent:
            agent.wait_for(lambda s: s.get(key("mps_control_up", pipe_dir=pipe)) == 1, timeout=30)
            tally = Tally(pipe)
            result["cpu_pressure_before"] = cpu_pressure()
            spinning = busy_loops(loops)
            started = time.monotonic()
            saturated_until = started + max(0.0, seconds - STOP_PHASE_SECONDS)
            next_write = started + 30
            while time.monotonic() < saturated_until:
                tally.scrape(agent, started)
                if time.monotonic() >= next_write:
                    out.write_text(json.dumps({**result, **tally.figures, "partial": True,
                                               "elapsed_seconds": round(time.monotonic() - started)}, indent=1))
                    next_write += 30
                time.sleep(max(0.0, SCRAPE_EVERY - (time.monotonic() - started) % SCRAPE_EVERY))
            result.update(tally.figures)
            result["cpu_pressure_saturated"] = cpu_pressure()
            up = key("mps_control_up", pipe_dir=pipe)
            stopped = key("mps_control_state", pipe_dir=pipe, state="timeout")
            # a SIGSTOP lands anywhere in the agent's 2 s cycle: a few of them, each timed
            result["sigstop_to_timeout_seconds"], result["sigcont_to_up_seconds"] = [], []
            for _ in range(STOP_TRIALS):
                os.kill(daemon_pid, signal.SIGSTOP)
                if fake:
                    daemon.update(mode="hang")  # the fake program does not talk to its stand-in daemon
                try:
                    result["sigstop_to_timeout_seconds"].append(time_until(
                        agent, lambda s: s.get(up) == 0 and s.get(stopped) == 1, timeout=10))
                finally:
                    os.kill(daemon_pid, signal.SIGCONT)
                    if fake:
                        daemon.update(mode="answer")
                result["sigcont_to_up_seconds"].append(time_until(agent, lambda s: s.get(up) == 1, timeout=10))
                time.sleep(0.7)  # a new phase in the cycle for the next
            result["saturated_seconds"] = round(time.monotonic() - started, 1)
    finally:
        for process in spinning:
            process.kill()
            process.wait()
        if holder is not None:
            holder.kill()
            holder.wait()
        if fake and daemon is not None:
            daemon.close()
        elif daemon is not None:
            daemon.cleanup()
    result["false_states"] = result.get("false_up_0", 0) + result.get("false_timeout_state", 0) + result.get(
        "no_up_series", 0)
    stops = result.get("sigstop_to_timeout_seconds") or [None]
    # 3 s: one interval plus one command timeout; 0.1 s: how often the scrapes look
    result["passed"] = result["false_states"] == 0 and result.get("collector_failed", 1) == 0 and \
        all(seen is not None and seen <= 3.1 for seen in stops)
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("MPSWATCH_BUSY_NODE_SECONDS", 600)))
    parser.add_argument("--out", default=os.environ.get("MPSWATCH_BUSY_NODE_OUT", "busy-node.json"))
    parser.add_argument("--loops", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fake", action="store_true", help="the fake control program, not a real daemon")
    parser.add_argument("--client", action="store_true", help="one real client held for the run (needs nvcc)")
    args = parser.parse_args()
    result = run(args.seconds, args.loops, Path(args.out), args.fake, args.client)
    print(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
