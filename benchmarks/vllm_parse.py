"""What parsing an engine's /metrics costs the engines collector, by body size.

    python -m benchmarks.vllm_parse [--quick]      # 300 parses a body (--quick: 50)

The collector parses every engine's body on every cycle (mpswatch.collectors.engines.parse_vllm_metrics,
prometheus_client's text parser, pure Python). Two bodies:
  - the tests' hand-written body (tests/fixtures/vllm/metrics-v0.10-names.txt, 24 samples), which the
    other benchmarks serve;
  - a full-size body, synthetic (tests.kit.fakevllm.full_size_body says what it holds).
For each, the parse as the agent does it (since commit edced73 it hands the parser only the lines
of the metrics it reads) and as it did before (the whole body to the parser), and whether both give
the same sample.
"""

from __future__ import annotations

import statistics
import sys
import time

from mpswatch.engine_kinds import vllm as engines
from mpswatch.engine_kinds.vllm import parse_vllm_metrics

from tests.kit.fakevllm import FakeVllm, full_size_body


def cost(fn, text: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    n = 50 if "--quick" in sys.argv else 300
    fake = FakeVllm()
    bodies = {"tests' body (hand-written, abridged)": fake.body(), "full-size body (synthetic)": full_size_body()}
    fake.close()
    print("| body | bytes | samples | whole body to the parser, median (p90) | only the lines read (now), median (p90) "
          "| same sample |")
    print("|---|---|---|---|---|---|")
    for label, text in bodies.items():
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        now = sorted(cost(parse_vllm_metrics, text, n))
        wanted = parse_vllm_metrics(text)
        engines._lines_read, read = (lambda _: ""), engines._lines_read  # no lines picked: the whole body
        try:
            whole = sorted(cost(parse_vllm_metrics, text, n))
            same = "yes" if parse_vllm_metrics(text) == wanted else "NO"
        finally:
            engines._lines_read = read
        pick = lambda v: f"{statistics.median(v) * 1e3:.2f} ms ({v[int(len(v) * 0.9)] * 1e3:.2f})"  # noqa: E731
        print(f"| {label} | {len(text.encode())} | {samples} | {pick(whole)} | {pick(now)} | {same} |")


if __name__ == "__main__":
    main()
