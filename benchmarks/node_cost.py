"""What the agent costs on a node, measured on the agent as a real process:

  - CPU as a share of one core at the default 2 s interval (from /proc/<pid>/stat over the run), the agent's
    own and with its children (cutime and cstime: the control-program runs it started and reaped), also as
    milliseconds a 2 s cycle,
  - each collector's cycle (median of mps_exporter_collector_duration_seconds over the run),
  - /metrics latency p50/p99 with one scraper (as Prometheus scrapes) and with 10 concurrent ones,
    and the series count,
  - RSS after start and at the end.

Two nodes, both on a CPU machine (no GPU): MPS replies come from the fake control program's replay
mode (tests/kit/fakecontrol.py: cat of recorded replies, a few ms a call like the real program), NVML
from the fake replaying a real H200 recording, engines are tests/kit/fakevllm.py processes with
vLLM-like command lines. The agent is the tests' (tests.kit.agentproc.Agent): it sees only this
run's processes.
  reference: 1 GPU, 1 control daemon, 2 engines
  large:     8 GPUs, 48 MPS clients per GPU, 16 engines

    python -m benchmarks.node_cost [--quick] [--full-bodies] [--node reference|large] [--every-cycle]
        # --quick: 20 s a node instead of 120 s; --full-bodies: the engines serve a full-size vLLM
        # body (tests.kit.fakevllm.full_size_body, 407 samples) instead of the tests' abridged one (26);
        # --every-cycle: the MPS daemon asked every cycle (mps_control.heartbeat_seconds 0), as before
        # issue 19. The log dir holds an empty control.log beside the real server.log, so the agent
        # asks on change otherwise
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from tests.kit.agentproc import Agent
from tests.kit.fakedaemon import FAKE_CONTROL, stand_in
from tests.kit.stagednode import NODES, node

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime; with `children`, also cutime + cstime (the children it has waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of the children this process has waited for (the control program runs, nvidia-smi)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_SCRAPER = """
import http.client, sys, time
host, port, start, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.monotonic()))
out = []
while time.monotonic() < stop:
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/metrics")
    connection.getresponse().read()
    connection.close()
    out.append(time.perf_counter() - started)
print(" ".join(f"{x:.6f}" for x in out))
"""


def scrapers(url: str, seconds: float, workers: int = 10) -> list[float]:
    """Latencies of `workers` scrapers, each its own process (as separate Prometheus servers are:
    threads of one Python process would also time each other's turns at the GIL), each scraping
    back to back with a new connection every time."""
    address = urllib.parse.urlsplit(url)
    start = time.monotonic() + 2.0  # all start together, after the interpreters have (CLOCK_MONOTONIC is host-wide)
    processes = [subprocess.Popen([sys.executable, "-c", _SCRAPER, address.hostname, str(address.port), str(start),
                                   str(start + seconds)], stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    latencies = []
    for process in processes:
        out = process.communicate()[0]
        if process.returncode != 0:
            raise RuntimeError(f"a scraper failed with {process.returncode}")
        latencies += [float(x) for x in out.split()]
    return latencies


def measure(name: str, gpus: int, clients_per_gpu: int, engine_count: int, seconds: float,
            full_bodies: bool = False, every_cycle: bool = False) -> dict:
    with node(name, gpus, clients_per_gpu, engine_count, full_bodies) as setup:
        work, pipe, log_dir, env = setup["work"], setup["pipe"], setup["log_dir"], setup["env"]
        (log_dir / "control.log").touch()
        daemon = stand_in("nvidia-cuda-mps-control", "-d", env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
        (pipe / "nvidia-cuda-mps-control.pid").write_text(f"{daemon.pid}\n")  # a live daemon, as /proc shows it
        env = {**env, **({"MPSWATCH_MPS_CONTROL_HEARTBEAT_SECONDS": "0"} if every_cycle else {})}
        try:
            with Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", str(pipe), "--log-dir", str(log_dir)], env=env,
                       log_path=work / "agent.log", nvml="from_layout") as agent:
                time.sleep(5)  # first cycles, GPM's second sample, backfill
                rss_start = rss_mib(agent.proc.pid)
                cpu_start, wall_start = cpu_seconds(agent.proc.pid), time.monotonic()
                cpu_all_start = cpu_seconds(agent.proc.pid, children=True)
                durations: dict[str, list[float]] = {}
                deadline = wall_start + seconds
                while time.monotonic() < deadline:
                    samples = agent.scrape()
                    for (metric, labels), value in samples.items():
                        if metric == "mps_exporter_collector_duration_seconds":
                            durations.setdefault(dict(labels)["collector"], []).append(value)
                    time.sleep(2)
                elapsed = time.monotonic() - wall_start
                cpu_share = (cpu_seconds(agent.proc.pid) - cpu_start) / elapsed
                cpu_all_share = (cpu_seconds(agent.proc.pid, children=True) - cpu_all_start) / elapsed
                samples = agent.scrape()
                series = len(samples)
                assert samples[("mps_control_up", frozenset({("pipe_dir", str(pipe))}))] == 1
                engines_up = sum(v for (m, _), v in samples.items() if m == "mps_engine_up")
                alone = sorted(scrapers(agent.url + "/metrics", min(30.0, seconds), workers=1))
                latencies = sorted(scrapers(agent.url + "/metrics", min(30.0, seconds)))
                rss_end = rss_mib(agent.proc.pid)
        finally:
            daemon.kill()
            daemon.wait()
    return {
        "node": name,
        "cpu_share_of_one_core": cpu_share,
        "cpu_with_children_share_of_one_core": cpu_all_share,
        "cpu_with_children_ms_per_2s_cycle": cpu_all_share * 2000,
        "every_cycle": every_cycle,
        "cycle_median_ms": {k: statistics.median(v) * 1e3 for k, v in sorted(durations.items())},
        "cycle_p90_ms": {k: sorted(v)[int(len(v) * 0.9)] * 1e3 for k, v in sorted(durations.items())},
        "scrape_one_p50_ms": alone[len(alone) // 2] * 1e3,
        "scrape_one_p99_ms": alone[int(len(alone) * 0.99)] * 1e3,
        "scrapes_one": len(alone),
        "scrape_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "scrape_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "scrapes": len(latencies),
        "series": series,
        "engines_up": engines_up,
        "engines_expected": engine_count,
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "seconds": seconds,
        "full_bodies": full_bodies,
    }


def main() -> None:
    seconds = 20.0 if "--quick" in sys.argv else 120.0
    names = [sys.argv[sys.argv.index("--node") + 1]] if "--node" in sys.argv else list(NODES)
    results = [measure(name, *NODES[name], seconds, "--full-bodies" in sys.argv, "--every-cycle" in sys.argv)
               for name in names]
    print(json.dumps(results, indent=2))
    print("\n| node | CPU (share of one core) | with children (ms a 2 s cycle) | cycle median / p90 (ms): mps_control, mps_logs, gpu, engines | "
          "scrape p50 / p99, one scraper (scrapes) | scrape p50 / p99, 10 scrapers (scrapes) | series | RSS start → end |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["engines_up"] != r["engines_expected"]:
            print(f"WARNING {r['node']}: the agent saw {r['engines_up']:.0f} engines up, not {r['engines_expected']}",
                  file=sys.stderr)
        cycles = ", ".join(f"{r['cycle_median_ms'][c]:.1f}/{r['cycle_p90_ms'][c]:.1f}"
                           for c in ("mps_control", "mps_logs", "gpu", "engines"))
        print(f"| {r['node']} | {r['cpu_share_of_one_core'] * 100:.2f} % | {r['cpu_with_children_share_of_one_core'] * 100:.2f} % "
              f"({r['cpu_with_children_ms_per_2s_cycle']:.1f} ms) | {cycles} | "
              f"{r['scrape_one_p50_ms']:.1f} / {r['scrape_one_p99_ms']:.1f} ms ({r['scrapes_one']}) | "
              f"{r['scrape_p50_ms']:.1f} / {r['scrape_p99_ms']:.1f} ms ({r['scrapes']}) | {r['series']} | "
              f"{r['rss_start_mib']:.0f} → {r['rss_end_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
