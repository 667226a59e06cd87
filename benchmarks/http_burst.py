"""The agent's HTTP server under abuse, measured on the agent as a real process (the reference node of
benchmarks/node_cost.py: a control daemon in replay, two engines, fake NVML):

  - burst: 500 scrapers connect at once, each GET /metrics with a 10 s timeout (Prometheus's default
    scrape timeout); answers that came back whole, latency p50/p99 (from the start of connect to the
    last byte). Three bursts, 5 s apart.
  - slow: 1,000 connections each send one byte a second of a request that never ends, and reconnect
    when the agent closes them (as a slowloris attacker does); meanwhile, once a second, the agent's
    threads and RSS and one normal scrape's latency. How many the agent closed.

The clients are one asyncio process per phase (threads of this process would time their own turns at
the GIL), beside the agent on the same machine.

    python -m benchmarks.http_burst [--quick] [--agent-checkout PATH] [--json OUT]
        # --quick: 20 s of slow connections instead of 60 s, one burst instead of three;
        # --agent-checkout: run the agent of another checkout of the repository (a `git worktree add`
        # of an older commit), for a before/after comparison; the stand-ins stay this checkout's.
"""

from __future__ import annotations

import http.client
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.node_cost import NODES, node, rss_mib
from tests.kit.agentproc import Agent
from tests.kit.fakedaemon import FAKE_CONTROL

_BURST = """
import asyncio, json, sys, time
port, count, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def scrape(start):
    await start.wait()
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.0\\r\\nHost: agent\\r\\n\\r\\n")
            data = await reader.read()
            writer.close()
    except (TimeoutError, OSError) as err:
        return None, type(err).__name__
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    length = [int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length:")]
    if not head.startswith(b"HTTP/1.0 200") or length != [len(body)]:
        return None, head.split(b"\\r\\n")[0].decode("latin-1") or "empty answer"
    return time.perf_counter() - began, None

async def main():
    start = asyncio.Event()
    tasks = [asyncio.create_task(scrape(start)) for _ in range(count)]
    await asyncio.sleep(0.5)
    start.set()
    print(json.dumps(await asyncio.gather(*tasks)))

asyncio.run(main())
"""

_SLOW = """
import asyncio, resource, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
closed = 0
REQUEST = b"GET /metrics HTTP/1.0\\r\\nX-Slow: " + b"a" * 1_000_000

async def hold(stop):
    global closed
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(1)
            continue
        try:
            for i in range(len(REQUEST)):
                if time.monotonic() >= stop:
                    break
                writer.write(REQUEST[i:i + 1])
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1), 1.0)  # b"" or data: the agent closed or answered
                except TimeoutError:
                    continue
                closed += 1
                break
        except OSError:
            closed += 1
        writer.transport.abort()

async def main():
    stop = time.monotonic() + seconds
    await asyncio.gather(*(hold(stop) for _ in range(count)))
    print(closed)

asyncio.run(main())
"""


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def one_scrape(port: int) -> float | None:
    """Latency of one normal scrape, None when it failed (10 s timeout)."""
    began = time.perf_counter()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        connection.close()
    except OSError:
        return None
    return time.perf_counter() - began if response.status == 200 else None


def burst(port: int, count: int = 500) -> dict:
    out = subprocess.run([sys.executable, "-c", _BURST, str(port), str(count), "10"], capture_output=True, text=True,
                         check=True)
    answers = json.loads(out.stdout)
    latencies = [latency for latency, _ in answers if latency is not None]
    failures: dict[str, int] = {}
    for _, why in answers:
        if why is not None:
            failures[why] = failures.get(why, 0) + 1
    return {"scrapers": count, "succeeded": len(latencies), "failures": failures,
            "p50_ms": percentile(latencies, 0.5) * 1e3 if latencies else None,
            "p99_ms": percentile(latencies, 0.99) * 1e3 if latencies else None,
            "max_ms": max(latencies) * 1e3 if latencies else None}


def slow(agent: Agent, seconds: float, count: int = 1000) -> dict:
    pid, port = agent.proc.pid, agent.port
    rss_before, threads_before = rss_mib(pid), threads(pid)
    attacker = subprocess.Popen([sys.executable, "-c", _SLOW, str(port), str(count), str(seconds)],
                                stdout=subprocess.PIPE, text=True)
    time.sleep(3)  # the connections are made
    samples: list[tuple[int, float]] = []
    latencies: list[float | None] = []
    while attacker.poll() is None:
        samples.append((threads(pid), rss_mib(pid)))
        latencies.append(one_scrape(port))
        time.sleep(1)
    closed = int(attacker.communicate()[0] or 0)
    answered = [x for x in latencies if x is not None]
    time.sleep(2)
    return {"connections": count, "seconds": seconds, "closed_by_agent": closed,
            "threads_before": threads_before, "threads_max": max(t for t, _ in samples),
            "rss_before_mib": rss_before, "rss_max_mib": max(r for _, r in samples), "rss_after_mib": rss_mib(pid),
            "rss_every_10_s_mib": [r for _, r in samples[::10]],
            "scrapes": len(latencies), "scrapes_failed": len(latencies) - len(answered),
            "scrape_p50_ms": statistics.median(answered) * 1e3 if answered else None,
            "scrape_max_ms": max(answered) * 1e3 if answered else None}


def main() -> None:
    quick = "--quick" in sys.argv
    env = {}
    checkout = "this checkout"
    if "--agent-checkout" in sys.argv:
        checkout = str(Path(sys.argv[sys.argv.index("--agent-checkout") + 1]).resolve())
        env["PYTHONPATH"] = f"{checkout}/agent:{checkout}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    with node("reference", *NODES["reference"]) as setup:
        with Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", str(setup["pipe"]), "--log-dir",
                    str(setup["log_dir"])], env={**setup["env"], **env}, log_path=setup["work"] / "agent.log",
                   nvml="from_layout") as agent:
            time.sleep(5)  # first cycles
            series = len(agent.scrape())
            rss_start = rss_mib(agent.proc.pid)
            bursts = []
            for round_ in range(1 if quick else 3):
                if round_:
                    time.sleep(5)
                bursts.append(burst(agent.port))
            slowloris = slow(agent, 20.0 if quick else 60.0)
            after = one_scrape(agent.port)
    result = {"agent": checkout, "series": series, "rss_start_mib": rss_start, "bursts": bursts, "slow": slowloris,
              "scrape_after_ms": after * 1e3 if after is not None else None}
    print(json.dumps(result, indent=2))
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
