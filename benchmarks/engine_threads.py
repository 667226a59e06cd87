"""Cost of reading an engine's CPU figures (stat and schedstat of every thread) for engines with
many threads. Real processes, real /proc; prints a Markdown table of medians.

    python -m benchmarks.engine_threads [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from mpswatch.collectors.engines import EnginesCollector, _Engine
from mpswatch.procfs import ProcessRow, ProcFS

CHILD = """
import sys, threading, time
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""


def measure(threads: int, rounds: int) -> list[float]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(threads)], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    collector = EnginesCollector(discover=False, procfs=ProcFS())
    engine = _Engine("bench", "http://127.0.0.1:1/metrics", "configured")
    times = []
    processes = {child.pid: ProcessRow(child.pid, None, [], None, 0)}
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            collector._cpu(engine, [child.pid], processes)
            times.append(time.perf_counter() - started)
    finally:
        child.kill()
        child.wait()
    return times


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 20 if quick else 100
    print("| threads in the engine | median per cycle | p90 | rounds |")
    print("|---|---|---|---|")
    for threads in (10, 100, 500, 1000):
        times = sorted(measure(threads, rounds))
        print(f"| {threads} | {statistics.median(times) * 1e3:.2f} ms | {times[int(len(times) * 0.9)] * 1e3:.2f} ms | {rounds} |")


if __name__ == "__main__":
    main()
