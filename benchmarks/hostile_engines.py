"""The agent's resident memory beside hostile engines: 18 loopback engines (2 of each kind in
tests/kit/hostileengines.py: never answering, headers or body at a byte a second, 1 GiB bodies,
endless chunked, a gzip bomb, redirects, huge headers, NaN and negative values) and a normal one,
all configured; `mpswatch run` (through the test kit's launcher, no GPU) scrapes them every 2 s.
Prints its VmRSS over time, its thread count, its malloc arenas at the end and whether the normal
engine stayed up; each against a control run with the normal engine alone.

    python -m benchmarks.hostile_engines [--seconds 60] [--repo PATH ...]
        # each --repo: a checkout whose agent is run (default: this one), e.g. the code before
        # issue 17 made with `git worktree add /tmp/eng17base aa65dc7`
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


def run_agent(repo: Path, urls: dict[str, str], seconds: float, every: float) -> dict[str, object]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSWATCH_")}
    env.update(PYTHONPATH=f"{repo / 'agent'}{os.pathsep}{repo}", MPSWATCH_ENGINE_SCRAPE_DISCOVER="false",
               MPSWATCH_ENGINES=",".join(f"{name}={url}" for name, url in urls.items()))
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
    args = parser.parse_args()
    hostile = subprocess.Popen([sys.executable, str(REPO / "tests" / "kit" / "hostileengines.py")],
                               stdout=subprocess.PIPE, text=True)
    normal = FakeVllm()
    try:
        urls = {"normal": normal.url, **json.loads(hostile.stdout.readline())}  # type: ignore[union-attr]
        report = [{"engines": engines, **run_agent(repo.resolve(), chosen, args.seconds, 1.0)}
                  for repo in args.repo or [REPO]
                  for engines, chosen in (("normal only", {"normal": urls["normal"]}), ("normal and 18 hostile", urls))]
    finally:
        normal.close()
        hostile.terminate()
        hostile.wait(timeout=20)
    print(json.dumps({"seconds": args.seconds, "runs": report}, indent=1))


if __name__ == "__main__":
    main()
