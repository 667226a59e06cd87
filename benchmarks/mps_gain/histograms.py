"""vLLM V1's latency histograms for the synthetic engine, without torch: the names, help texts,
labels (`model_name`, `engine`) and buckets of vllm/v1/metrics/loggers.py (PrometheusStatLogger),
over bucket counts of our own exposed by a custom collector."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# vLLM V1's latency histograms (vllm/v1/metrics/loggers.py, PrometheusStatLogger): names, help and buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
LATENCY_FAMILIES = {  # what the engine observes: (the vLLM families it is exported as, their buckets)
    "ttft": ((("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),), TTFT_BUCKETS),
    # the agent reads inter_token_latency_seconds first and falls back on the older name, which vLLM
    # 0.10 still served beside it (deprecated) with the same observations: both, from the same counts
    "itl": ((("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
             ("vllm:time_per_output_token_seconds",
              "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.")),
            ITL_BUCKETS),
    "e2e": ((("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),),
            REQUEST_LATENCY_BUCKETS),
    "queue": ((("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),),
              REQUEST_LATENCY_BUCKETS),
}


class LatencyHistograms:
    """vLLM's latency histograms as a custom collector over bucket counts of our own: one step of a
    batch observes the same latency for each of its sequences, which `observe(value, times)` adds in
    one bisect and three additions under a lock (prometheus_client's Histogram would take a lock and
    a bucket loop per sequence). Exposed with vLLM's labels, model_name and engine."""

    def __init__(self, model_name: str, engine: str = "0") -> None:
        self.labels = [model_name, engine]
        self.lock = threading.Lock()
        self.bounds = {key: bounds for key, (_, bounds) in LATENCY_FAMILIES.items()}
        self.counts = {key: [0] * (len(bounds) + 1) for key, bounds in self.bounds.items()}  # the last: +Inf only
        self.sums = dict.fromkeys(self.bounds, 0.0)

    def observe(self, key: str, value: float, times: int = 1) -> None:
        """`times` observations of `value` seconds (`le` buckets: a value on a bound counts in it)."""
        index = bisect.bisect_left(self.bounds[key], value)
        with self.lock:
            self.counts[key][index] += times
            self.sums[key] += value * times

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self.lock:
            counts = {key: list(values) for key, values in self.counts.items()}
            sums = dict(self.sums)
        for key, (families, bounds) in LATENCY_FAMILIES.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*bounds, float("inf")), counts[key], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            for name, documentation in families:
                family = HistogramMetricFamily(name, documentation, labels=["model_name", "engine"])
                family.add_metric(self.labels, buckets, sums[key])
                yield family
