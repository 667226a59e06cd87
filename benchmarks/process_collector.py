"""What the `process` collector costs (the agent's own process_* figures, issue 20): one collect()
(its /proc/self reads) and one render of its data, each timed many times in this process.

    python -m benchmarks.process_collector [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mpswatch.collectors.process import PROCESS_INTERVAL_SECONDS, ProcessCollector, render
from mpswatch.metrics import Families
from mpswatch.snapshot import DerivedFacts


def timed(call, rounds: int) -> dict[str, float]:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {"median_us": round(statistics.median(seconds) * 1e6, 1), "p90_us": round(seconds[int(rounds * 0.9)] * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    rounds = parser.parse_args().rounds
    collector = ProcessCollector()
    data = collector.collect()
    collect = timed(collector.collect, rounds)
    rendering = timed(lambda: render(data, DerivedFacts(), Families()), rounds)
    print(json.dumps({"collect": collect, "render": rendering, "interval_seconds": PROCESS_INTERVAL_SECONDS,
                      "share_of_one_core": collect["median_us"] / 1e6 / PROCESS_INTERVAL_SECONDS}))


if __name__ == "__main__":
    main()
