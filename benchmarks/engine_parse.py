"""What parsing an engine's /metrics costs the engines collector, by engine kind and body.

    python -m benchmarks.engine_parse [--quick]      # 300 parses a body (--quick: 50)

The collector parses every engine's body on every cycle (mpswatch.engine_kinds.kinds.parse_engine_metrics,
prometheus_client's text parser, pure Python), handing the parser only the lines of the metrics the
engine's kind reads (mpswatch.engine_kinds.reading.lines_read). Bodies:
  - each kind's fixtures (tests/fixtures/engines, hand-written in the shapes of the engines' sources);
  - vLLM's full-size body, synthetic (tests.kit.fakevllm.full_size_body says what it holds).
For each, the parse as the agent does it (kind recognised from the body, only the lines read) and
with the whole body to the parser, and whether both give the same sample.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mpswatch.engine_kinds import reading
from mpswatch.engine_kinds.kinds import parse_engine_metrics

from tests.kit.fakevllm import full_size_body

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "engines"


def cost(fn: Callable[[str], object], text: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - started)
    return sorted(times)


def main() -> None:
    n = 50 if "--quick" in sys.argv else 300
    bodies = {path.name: path.read_text() for path in sorted(FIXTURES.glob("*.txt"))}
    bodies["vLLM full-size body (synthetic)"] = full_size_body()
    print("| body | kind | bytes | samples | whole body to the parser, median (p90) | only the lines read (now), "
          "median (p90) | same sample |")
    print("|---|---|---|---|---|---|---|")
    for label, text in bodies.items():
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        wanted = parse_engine_metrics(text)
        now = cost(parse_engine_metrics, text, n)
        read, reading.lines_read = reading.lines_read, (lambda body, *_: body)  # noqa: E731 - every line kept
        try:
            whole = cost(parse_engine_metrics, text, n)
            same = "yes" if parse_engine_metrics(text) == wanted else "NO"
        finally:
            reading.lines_read = read
        pick = lambda v: f"{statistics.median(v) * 1e3:.2f} ms ({v[int(len(v) * 0.9)] * 1e3:.2f})"  # noqa: E731
        print(f"| {label} | {wanted.kind} | {len(text.encode())} | {samples} | {pick(whole)} | {pick(now)} | {same} |")


if __name__ == "__main__":
    main()
