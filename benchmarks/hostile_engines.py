"""The agent's resident memory beside hostile engines: 18 loopback engines (2 of each kind in
tests/kit/hostileengines.py: never answering, headers or body at a byte a second, 1 GiB bodies,
endless chunked, a gzip bomb, redirects, huge headers, NaN and negative values) and a normal one,
all configured; `mpswatch run` (through the test kit's launcher, no GPU) scrapes them every 2 s.
Prints its VmRSS over time, its thread count, its malloc arenas at the end and whether the normal
engine stayed up; each against a control run with the normal engine alone.

    python -m benchmarks.hostile_engines [--seconds 60] [--repo PATH ...] [--kinds KIND,...]
                                         [--malloc-arena-max N] [--tracemalloc]
        # each --repo: a checkout whose agent is run (default: this one), e.g. the code before
        # issue 17 made with `git worktree add /tmp/eng17base aa65dc7`;
        # --kinds: only these hostile kinds (2 of each); --malloc-arena-max: glibc's MALLOC_ARENA_MAX
        # for the agent; --tracemalloc: the engines collector alone, in a process of its own, traced
        # by tracemalloc: its peak of Python allocations and where they were made at that peak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.kit.agentproc import free_port
from tests.kit.fakevllm import FakeVllm

REPO = Path(__file__).resolve().parents[1]


def status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def malloc_arenas(pid: int) -> tuple[int, float]:
    """glibc's per-thread malloc arenas: anonymous mappings that start on a 64 MiB boundary (arenas
    reserve their heaps 64 MiB at a time, so aligned); how many and the MiB they hold resident."""
    count, resident, arena = 0, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and "-" in fields[0] and fields[1].startswith("rw"):
            arena = int(fields[0].split("-")[0], 16) % (64 << 20) == 0
            count += arena
        elif len(fields) >= 5 and "-" in fields[0]:
            arena = False
        elif fields[0] == "Rss:" and arena:
            resident += int(fields[1])
    return count, round(resident / 1024, 1)


def normal_engine_up(metrics_url: str) -> bool | None:
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return 'mps_engine_up{engine="normal"} 1' in text


def trace_collector(urls: dict[str, str], seconds: float) -> None:
    """In the child: the engines collector on its own, every 2 s, under tracemalloc; prints its peak
    and the ten largest allocation sites of the largest of the snapshots taken every 0.2 s."""
    import threading
    import tracemalloc

    from mpswatch.collectors.engines import EnginesCollector

    tracemalloc.start(1)
    collector = EnginesCollector(configured=[{"name": n, "url": u} for n, u in urls.items()], discover=False)
    largest: list[tracemalloc.Snapshot] = []
    largest_size = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            current = tracemalloc.get_traced_memory()[0]
            if current > largest_size[0]:
                largest_size[0] = current
                largest[:] = [tracemalloc.take_snapshot()]

    threading.Thread(target=sample, daemon=True).start()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        collector.collect()
        time.sleep(2.0)
    stop.set()
    top = largest[0].statistics("lineno")[:10] if largest else []
    print(json.dumps({
        "traced_peak_mib": round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
        "largest_snapshot_mib": round(largest_size[0] / 2**20, 1),
        "top_sites_mib": {f"{Path(stat.traceback[0].filename).name}:{stat.traceback[0].lineno}":
                          round(stat.size / 2**20, 2) for stat in top},
        "vm_rss_mib": round(status_field(os.getpid(), "VmRSS") / 1024, 1),
    }))


def child_env(repo: Path, urls: dict[str, str], arena_max: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSWATCH_")}
    env.update(PYTHONPATH=f"{repo / 'agent'}{os.pathsep}{repo}", MPSWATCH_ENGINE_SCRAPE_DISCOVER="false",
               MPSWATCH_ENGINES=",".join(f"{name}={url}" for name, url in urls.items()))
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    return env


def run_traced(repo: Path, urls: dict[str, str], seconds: float) -> dict[str, object]:
    env = child_env(repo, urls, None)
    env["PYTHONPATH"] = f"{repo / 'agent'}{os.pathsep}{REPO}"  # this checkout's benchmark, that one's agent
    command = [sys.executable, "-m", "benchmarks.hostile_engines", "--trace-child", json.dumps(urls), str(seconds)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120, check=True)
    return {"repo": str(repo), **json.loads(run.stdout.splitlines()[-1])}


def run_agent(repo: Path, urls: dict[str, str], seconds: float, every: float, arena_max: int | None = None
              ) -> dict[str, object]:
    port = free_port()
    env = child_env(repo, urls, arena_max)
    command = [sys.executable, "-m", "tests.kit.agent", "--nvml", "no_driver", "run", "--listen", f"127.0.0.1:{port}"]
    agent = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float, int]] = []
    up: list[bool | None] = []
    try:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            samples.append((round(elapsed, 1), status_field(agent.pid, "VmRSS") / 1024, status_field(agent.pid, "Threads")))
            if elapsed > 5:
                up.append(normal_engine_up(f"http://127.0.0.1:{port}/metrics"))
            time.sleep(max(0.0, every - (time.monotonic() - started - elapsed)))
        arenas = malloc_arenas(agent.pid)
    finally:
        agent.terminate()
        agent.wait(timeout=20)
    rss = [mib for _, mib, _ in samples]
    last_half = rss[len(rss) // 2:]
    return {
        "repo": str(repo),
        "rss_mib_first": round(rss[0], 1),
        "rss_mib_max": round(max(rss), 1),
        "rss_mib_median_second_half": round(statistics.median(last_half), 1),
        "rss_mib_last": round(rss[-1], 1),
        "threads_max": max(threads for _, _, threads in samples),
        "malloc_arenas_at_end": {"count": arenas[0], "rss_mib": arenas[1]},
        "normal_engine_up_ratio": round(sum(1 for u in up if u) / len(up), 2) if up else None,
        "rss_mib_every_10s": [round(mib, 1) for _, mib, _ in samples[::max(1, round(10 / every))]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repo", type=Path, action="append", help="a checkout whose agent runs (default: this one)")
    parser.add_argument("--kinds", default="", help="comma-separated hostile kinds (default: all)")
    parser.add_argument("--malloc-arena-max", type=int)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--trace-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trace_child:
        trace_collector(json.loads(args.trace_child[0]), float(args.trace_child[1]))
        return
    kinds = [kind for kind in args.kinds.split(",") if kind]
    hostile = subprocess.Popen([sys.executable, str(REPO / "tests" / "kit" / "hostileengines.py"), *kinds],
                               stdout=subprocess.PIPE, text=True)
    normal = FakeVllm()
    try:
        urls = {"normal": normal.url, **json.loads(hostile.stdout.readline())}  # type: ignore[union-attr]
        mix = f"normal and {len(urls) - 1} hostile"
        if args.tracemalloc:
            report = [{"engines": mix, **run_traced(repo.resolve(), urls, args.seconds)} for repo in args.repo or [REPO]]
        else:
            report = [{"engines": engines, **run_agent(repo.resolve(), chosen, args.seconds, 1.0, args.malloc_arena_max)}
                      for repo in args.repo or [REPO]
                      for engines, chosen in (("normal only", {"normal": urls["normal"]}), (mix, urls))]
    finally:
        normal.close()
        hostile.terminate()
        hostile.wait(timeout=20)
    print(json.dumps({"seconds": args.seconds, "kinds": kinds or "all", "malloc_arena_max": args.malloc_arena_max,
                      "runs": report}, indent=1))


if __name__ == "__main__":
    main()
