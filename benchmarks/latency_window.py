"""What the engines' latency windows hold in memory.

    python -m benchmarks.latency_window

16 engines at the defaults (a scrape every 2 s, a 60 s window: 31 scrapes kept), each scrape the
full-size vLLM body's four latency histograms (tests.kit.fakevllm.full_size_body), measured with
tracemalloc beside the same parses with nothing kept (the parser's own caches).
"""

from __future__ import annotations

import tracemalloc

from mpswatch.engine_kinds.vllm import parse_vllm_metrics
from mpswatch.latency import LatencyWindow

from tests.kit.fakevllm import full_size_body

ENGINES, SCRAPES, INTERVAL_SECONDS, WINDOW_SECONDS = 16, 31, 2.0, 60.0


def traced(keep: bool) -> int:
    body = full_size_body()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    windows = [LatencyWindow(WINDOW_SECONDS) for _ in range(ENGINES)]
    for window in windows:
        for scrape in range(SCRAPES):
            latencies = parse_vllm_metrics(body).latencies
            if keep:
                window.add(scrape * INTERVAL_SECONDS, latencies)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held


def main() -> None:
    parsed_only, kept = traced(keep=False), traced(keep=True)
    print(f"{ENGINES} engines, {SCRAPES} scrapes kept each: {(kept - parsed_only) / 1024:.0f} KiB "
          f"({(kept - parsed_only) / 1024 / ENGINES:.0f} KiB an engine)")


if __name__ == "__main__":
    main()
