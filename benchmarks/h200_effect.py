"""Does the agent slow GPU work down? Two MPS clients run bf16 matrix products for the whole run
(benchmarks/gpu_work.py, reporting their progress continuously) while the agent, polling every
second, is started and stopped in alternating blocks: off, on, off, ..., off.

    python -m benchmarks.h200_effect [--quick] [--block-seconds 20] [--blocks 21] [--settle-seconds 4] OUT.json
        # --quick: 7 blocks of 10 s, 3 s settling (about 1.5 minutes; three pairs, indicative only)

Each block's rate is the clients' steps per second between its start plus the settling time and
its end (the agent's start-up and exit are left out of both kinds of block). Each "on" block is
compared with the mean of the two "off" blocks around it, so the slow drift of these machines'
rates (clocks, other tenants) cancels. The effect is within noise when the 95 % t-interval of the
mean paired difference contains zero; its lower end bounds the slowdown. The same comparison made
for an "off" block against the "off" blocks two places away (a placebo) checks the noise model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path

from benchmarks.mps_gain.run import stop_process
from benchmarks.node_cost import cpu_seconds
from tests.kit.agentproc import agent_env, free_port, mpswatch_cmd, parse_exposition

CLIENT_SIZES = (4096, 8192)
GPU_WORK = Path(__file__).resolve().parent / "gpu_work.py"


def steps_at(progress: Sequence[tuple[float, int]], when: float) -> float:
    """Steps done by `when`, interpolated between the client's reports."""
    times = [t for t, _ in progress]
    i = bisect_left(times, when)
    if i == 0 or i == len(progress):
        raise ValueError(f"no progress reported around {when:.3f}")
    (t0, s0), (t1, s1) = progress[i - 1], progress[i]
    return s0 + (s1 - s0) * (when - t0) / (t1 - t0)


def rate(progresses: Sequence[Sequence[tuple[float, int]]], start: float, end: float) -> float:
    """All clients' steps per second between two monotonic times."""
    return sum(steps_at(p, end) - steps_at(p, start) for p in progresses) / (end - start)


def relative_to_neighbours(rates: Sequence[float], index: int, distance: int) -> float:
    baseline = (rates[index - distance] + rates[index + distance]) / 2
    return rates[index] / baseline - 1


# Student's t, 97.5th percentile, for 1 to 30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(degrees: int) -> float:
    if degrees <= len(_T975):
        return _T975[degrees - 1]
    z = 1.959964  # Cornish-Fisher expansion beyond the table: exact to 3 decimals there
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


def mean_interval(effects: Sequence[float]) -> tuple[float, float]:
    """95 % t-interval of the mean effect. Two neighbouring "on" blocks share the "off" block
    between them, so their effects are correlated (1/6 for independent block noise); the variance
    of the mean grows by 1 + (n - 1) / 3n accordingly."""
    n = len(effects)
    mean = statistics.fmean(effects)
    half = t975(n - 1) * statistics.stdev(effects) * ((1 + (n - 1) / (3 * n)) / n) ** 0.5
    return mean - half, mean + half


def summarise(kinds: Sequence[str], rates: Sequence[float]) -> dict:
    """Paired effects of the "on" blocks, their interval, and the placebo of the "off" blocks (the
    same comparison where nothing changed: a check that the blocks' noise is what the interval assumes)."""
    if len(kinds) < 7 or list(kinds) != ["off", "on"] * (len(kinds) // 2) + ["off"]:
        raise ValueError("blocks must alternate off, on, ..., off, at least 7 of them")
    effects = [relative_to_neighbours(rates, i, 1) for i, kind in enumerate(kinds) if kind == "on"]
    placebo = [relative_to_neighbours(rates, i, 2) for i, kind in enumerate(kinds)
               if kind == "off" and 2 <= i < len(kinds) - 2]
    low, high = mean_interval(effects)
    return {
        "on_blocks": len(effects),
        "effect_mean_ratio": statistics.fmean(effects),
        "effect_median_ratio": statistics.median(effects),
        "effect_ci95_ratio": [low, high],
        "effect_stdev_ratio": statistics.stdev(effects),
        "placebo_blocks": len(placebo),
        "placebo_mean_ratio": statistics.fmean(placebo),
        "placebo_stdev_ratio": statistics.stdev(placebo),
        "within_noise": low <= 0 <= high,
    }


class WorkClient:
    """One gpu_work.py process and the progress it has reported so far."""

    def __init__(self, size: int, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, str(GPU_WORK), str(size)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"GPU work client failed to start: {ready!r}")
        self.progress: list[tuple[float, int]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            when, steps = line.split()
            self.progress.append((float(when), int(steps)))

    def reported_past(self, when: float) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"GPU work client {self.process.pid} exited with {self.process.returncode}")
        return bool(self.progress) and self.progress[-1][0] >= when

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self._reader.join(10)


def _wait_for_reports(clients: Sequence[WorkClient], when: float, timeout: float = 30.0) -> None:
    """Until every client has reported a step after `when` (a step takes well under a second)."""
    deadline = time.monotonic() + timeout
    while not all(client.reported_past(when) for client in clients):
        if time.monotonic() > deadline:
            raise RuntimeError(f"GPU work clients stopped reporting for {timeout:g} s")
        time.sleep(0.05)


def _agent_cpu_seconds(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except OSError:  # the agent died: the block's row says so instead of ending the run
        return None


def _agent_view(url: str) -> dict[str, float]:
    """The agent's own account that it was watching: control daemon and GPU up."""
    with urllib.request.urlopen(url, timeout=5) as response:
        samples = parse_exposition(response.read().decode())
    return {name: value for (name, _), value in samples.items() if name in ("mps_control_up", "mps_gpu_up")}


def run_blocks(mps, block_seconds: float, blocks: int, settle_seconds: float, log=print) -> dict:
    """Alternating blocks on one MPS daemon (tests.kit.realmps.MpsDaemon); returns the raw blocks
    and their summary."""
    if blocks < 7 or blocks % 2 == 0:
        raise ValueError("blocks must be odd and at least 7 (off, on, ..., off): three on, two placebo blocks")
    clients = [WorkClient(size, mps.env) for size in CLIENT_SIZES]
    rows = []
    try:
        time.sleep(settle_seconds)  # both clients in their steady state
        for index in range(blocks):
            kind = "on" if index % 2 else "off"
            started = time.monotonic()
            agent = None
            port = free_port()
            if kind == "on":
                env = agent_env({"MPSWATCH_GPU_INTERVAL_SECONDS": "1", "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "1",
                                 "MPSWATCH_MPS_LOGS_INTERVAL_SECONDS": "1"})
                agent = subprocess.Popen(mpswatch_cmd("run", "--listen", f"127.0.0.1:{port}", "--pipe-dir", str(mps.pipe_dir),
                                                      "--log-dir", str(mps.log_dir), "--interval", "1"),
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(settle_seconds)
            window_start = time.monotonic()
            cpu_start = _agent_cpu_seconds(agent.pid) if agent else None
            time.sleep(max(0.0, started + block_seconds - time.monotonic()))
            window_end = time.monotonic()
            row = {"kind": kind, "window_seconds": window_end - window_start}
            if agent is not None:
                cpu_end = _agent_cpu_seconds(agent.pid)
                if cpu_start is not None and cpu_end is not None:
                    row["agent_cpu_share_of_core"] = (cpu_end - cpu_start) / (window_end - window_start)
                try:
                    row["agent_view"] = _agent_view(f"http://127.0.0.1:{port}/metrics")
                except OSError as err:
                    row["agent_view"] = {"error": repr(err)}
                row["agent_watching"] = row["agent_view"] == {"mps_control_up": 1.0, "mps_gpu_up": 1.0}
                stop_process(agent)
            _wait_for_reports(clients, window_end)
            row["steps_per_second"] = rate([c.progress for c in clients], window_start, window_end)
            rows.append(row)
            log(index, kind, round(row["steps_per_second"], 2), row.get("agent_view", ""))
    finally:
        for client in clients:
            client.stop()
    summary = summarise([r["kind"] for r in rows], [r["steps_per_second"] for r in rows])
    summary["on_blocks_agent_watching"] = sum(1 for r in rows if r.get("agent_watching"))
    return {"block_seconds": block_seconds, "settle_seconds": settle_seconds, "client_sizes": CLIENT_SIZES,
            "blocks": rows, "summary": summary}


def main() -> None:
    from tests.kit.realmps import MpsDaemon

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-seconds", type=float, default=20.0)
    parser.add_argument("--blocks", type=int, default=21)
    parser.add_argument("--settle-seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("out")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.block_seconds, args.settle_seconds = 7, 10.0, 3.0
    mps = MpsDaemon(Path(tempfile.mkdtemp(prefix="mpswatch-effect-")) / "mps")
    try:
        mps.start()
        result = run_blocks(mps, args.block_seconds, args.blocks, args.settle_seconds)
    finally:
        mps.cleanup()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
