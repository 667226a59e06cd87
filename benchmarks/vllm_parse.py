"""What parsing an engine's /metrics costs the engines collector, by body size.

    python benchmarks/vllm_parse.py [--quick]      # 300 parses a body (--quick: 50)

The collector parses every engine's body on every cycle (mpswatch.collectors.engines.parse_vllm_metrics,
prometheus_client's text parser, pure Python). Two bodies:
  - the tests' hand-written body (tests/fixtures/vllm/metrics-v0.10-names.txt, 24 samples), which the
    other benchmarks serve;
  - a full-size body, synthetic: every family vLLM v1 (about v0.10) exports on /metrics with its
    buckets, plus prometheus_client's process/python families and prometheus_fastapi_instrumentator's
    http families (shared/reference/anchors-notes.md §3), one engine, one model. Not a recording:
    vLLM cannot run on this project's machines.
For each, the parse as the agent does it (since commit edced73 it hands the parser only the lines
of the metrics it reads) and as it did before (the whole body to the parser), and whether both give
the same sample.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent")]

from mpswatch.engine_kinds import vllm as engines  # noqa: E402
from mpswatch.engine_kinds.vllm import parse_vllm_metrics  # noqa: E402
from tests.fakevllm import FakeVllm  # noqa: E402

MODEL = 'engine="0",model_name="Qwen/Qwen2.5-1.5B-Instruct"'
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
ONE_TWO_FIVE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]  # up to max_model_len 32768
HISTOGRAMS = {
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "vllm:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                                         7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:request_time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_prompt_tokens": ONE_TWO_FIVE,
    "vllm:request_generation_tokens": ONE_TWO_FIVE,
    "vllm:request_max_num_generation_tokens": ONE_TWO_FIVE,
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    "vllm:request_params_max_tokens": ONE_TWO_FIVE,
}
HANDLERS = ("/v1/chat/completions", "/v1/completions", "/metrics", "/health")
HTTP_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10, 30, 60]


def full_size_body(template: bool = False) -> str:
    """`template`: with tests/fakevllm.py's placeholders for the values it fills in on each request."""
    out: list[str] = []
    running, waiting, kv, prompt, generation = (
        ("{running}", "{waiting}", "{kv}", "{prompt}", "{generation}") if template else (3.0, 1.0, 0.42, 750.0, 250.0))

    def family(name: str, kind: str, samples: list[tuple[str, str, object]]) -> None:
        out.append(f"# HELP {name} {name.split(':')[-1].replace('_', ' ')}.")
        out.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            out.append(f"{sample}{{{labels}}} {value}" if labels else f"{sample} {value}")

    def histogram(name: str, buckets: list[float], labels: str = MODEL) -> None:
        samples = [(f"{name}_bucket", f'{labels},le="{float(b)}"', float(i * 7)) for i, b in enumerate(buckets)]
        samples += [(f"{name}_bucket", f'{labels},le="+Inf"', float(len(buckets) * 7)),
                    (f"{name}_count", labels, float(len(buckets) * 7)), (f"{name}_sum", labels, 1234.5),
                    (f"{name}_created", labels, 1.7e9)]
        family(name, "histogram", samples)

    def counter(name: str, labels: str = MODEL, value: object = 1000.0) -> None:
        family(f"{name}_total", "counter", [(f"{name}_total", labels, value), (f"{name}_created", labels, 1.7e9)])

    for gen in range(3):
        out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {1000.0 * gen}')
    family("python_info", "gauge", [("python_info", 'implementation="CPython",major="3",minor="12"', 1.0)])
    for name in ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_cpu_seconds_total", "process_open_fds", "process_max_fds"):
        family(name, "gauge", [(name, "", 12345.0)])
    for handler in HANDLERS:
        for status in ("2xx", "4xx"):
            out.append(f'http_requests_total{{handler="{handler}",method="POST",status="{status}"}} 500.0')
    for name in ("http_request_size_bytes", "http_response_size_bytes"):
        for handler in HANDLERS:
            labels = f'handler="{handler}"'
            family(name, "summary", [(f"{name}_count", labels, 500.0), (f"{name}_sum", labels, 9e5),
                                     (f"{name}_created", labels, 1.7e9)])
    histogram("http_request_duration_highr_seconds", HTTP_BUCKETS, labels='method="POST"')
    for handler in HANDLERS:
        histogram("http_request_duration_seconds", [0.1, 0.5, 1.0], labels=f'handler="{handler}",method="POST"')
    family("vllm:num_requests_running", "gauge", [("vllm:num_requests_running", MODEL, running)])
    family("vllm:num_requests_waiting", "gauge", [("vllm:num_requests_waiting", MODEL, waiting)])
    family("vllm:kv_cache_usage_perc", "gauge", [("vllm:kv_cache_usage_perc", MODEL, kv)])
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions"):
        counter(name)
    counter("vllm:prompt_tokens", value=prompt)
    counter("vllm:generation_tokens", value=generation)
    family("vllm:request_success_total", "counter",
           [("vllm:request_success_total", f'{MODEL},finished_reason="{r}"', 10.0) for r in ("stop", "length", "abort")])
    for name, buckets in HISTOGRAMS.items():
        histogram(name, buckets)
    family("vllm:cache_config_info", "gauge",
           [("vllm:cache_config_info", 'block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
                                       'gpu_memory_utilization="0.45",num_gpu_blocks="31542"', 1.0)])
    return "\n".join(out) + "\n"


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
