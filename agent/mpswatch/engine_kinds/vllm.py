"""vLLM: its /metrics text (current names, the older `gpu_cache_usage_perc`, several engines or
models behind one server) and its command lines (`vllm serve`, the OpenAI API-server module)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mpswatch.engine_kinds import BadMetrics, EngineCommand, EngineSample, Histogram

DEFAULT_PORT = 8000


def parse_vllm_metrics(text: str) -> EngineSample:
    """Sums over vLLM's label sets (several engines or models behind one server). Knows the
    current names and the older `vllm:gpu_cache_usage_perc`; refuses text with no vLLM metric.
    Every value read is a count, a total or a ratio: a NaN, an infinity, a negative value or a
    series given twice (which a sum would double) makes that metric unknown, and is counted in
    `rejected` by reason (REJECT_REASONS)."""
    sums: dict[str, float] = {}
    kv_values: list[float] = []
    series: dict[tuple[Any, ...], float] = {}
    seen: set[tuple[Any, ...]] = set()
    refused: set[str] = set()  # sample names with a rejected sample: their value is unknown
    rejected: dict[str, int] = {}
    model = gpu_memory_utilization = None
    found = False

    def reject(reason: str, name: str) -> None:
        rejected[reason] = rejected.get(reason, 0) + 1
        refused.add(name)

    try:
        # only the lines read below; a body with none of them is parsed whole, to say what is wrong
        families = list(text_string_to_metric_families(_lines_read(text) or text))
        for family in families:
            if not family.name.startswith("vllm:"):
                continue
            found = True
            for sample in family.samples:
                model = model or sample.labels.get("model_name")
                if sample.name == "vllm:cache_config_info" and "gpu_memory_utilization" in sample.labels:
                    try:
                        utilization = float(sample.labels["gpu_memory_utilization"])
                    except ValueError:
                        utilization = None
                    reason = None if utilization is None else _unfit(utilization)
                    if reason is not None:
                        reject(reason, "gpu_memory_utilization")
                    elif utilization is not None:
                        gpu_memory_utilization = utilization
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, *sorted(sample.labels.items()))
                reason = "duplicate_series" if key in seen else _unfit(sample.value)
                seen.add(key)
                if reason is not None:
                    reject(reason, sample.name)
                    continue
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                if sample.name in _TOKEN_COUNTERS:
                    series[key] = sample.value
                if sample.name in _KV_USAGE:
                    kv_values.append(sample.value)
    except Exception as err:  # the parser raises several kinds on malformed text
        raise BadMetrics(f"not Prometheus text: {err}"[:200]) from None
    if not found:
        raise BadMetrics("no vllm: metric in the body")
    for name in refused:
        sums.pop(name, None)
    series = {key: value for key, value in series.items() if key[0] not in refused}
    kv = None if refused & set(_KV_USAGE) or not kv_values else sum(kv_values) / len(kv_values)  # a ratio: averaged
    return EngineSample(
        model=model,
        requests_running=sums.get("vllm:num_requests_running"),
        requests_waiting=sums.get("vllm:num_requests_waiting"),
        prompt_tokens_total=sums.get("vllm:prompt_tokens_total"),
        generation_tokens_total=sums.get("vllm:generation_tokens_total"),
        kv_cache_usage_ratio=kv,
        gpu_memory_utilization=None if "gpu_memory_utilization" in refused else gpu_memory_utilization,
        token_series=series,
        prompt_tokens_per_request=_mean(sums, "vllm:request_prompt_tokens"),
        generation_tokens_per_request=_mean(sums, "vllm:request_generation_tokens"),
        rejected=rejected,
        latencies=_latencies(families, refused),
    )


# vLLM's latency histograms by LATENCIES name, the first name a body has taken: V1 0.10+ names its
# inter-token latency `inter_token_latency_seconds`, earlier versions `time_per_output_token_seconds`
# (the same per-token observations; `request_time_per_output_token_seconds` is a per-request mean)
_LATENCY_HISTOGRAMS = {
    "time_to_first_token": ("vllm:time_to_first_token_seconds",),
    "inter_token": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "queue": ("vllm:request_queue_time_seconds",),
    "end_to_end": ("vllm:e2e_request_latency_seconds",),
}


def _latencies(families: Iterable[Metric], refused: set[str]) -> dict[str, Histogram]:
    """vLLM's latency histograms, each summed over its label sets (engines, models) bound by bound;
    a histogram with a refused sample, or a bucket whose `le` is no number, is unknown."""
    found: dict[str, Histogram] = {}
    by_name = {family.name: family for family in families}
    for latency, names in _LATENCY_HISTOGRAMS.items():
        for name in names:
            family = by_name.get(name)
            if family is None or not family.samples:  # HELP and TYPE only until a first request: absent
                continue
            if {f"{name}_bucket", f"{name}_sum", f"{name}_count"} & refused:
                break
            buckets: dict[float, float] = {}
            total = count = 0.0
            try:
                for sample in family.samples:
                    if sample.name == f"{name}_bucket":
                        bound = float(sample.labels["le"])
                        if math.isnan(bound):
                            raise ValueError(bound)
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
                    elif sample.name == f"{name}_sum":
                        total += sample.value
                    elif sample.name == f"{name}_count":
                        count += sample.value
            except (KeyError, ValueError):
                break
            if buckets:
                found[latency] = Histogram(tuple(sorted(buckets.items())), total, count)
            break
    return found


def _unfit(value: float) -> str | None:
    """Why a value read cannot be a count, a total or a ratio; None when it can."""
    if not math.isfinite(value):
        return "not_finite"
    return "negative" if value < 0 else None


def _mean(sums: dict[str, float], histogram: str) -> float | None:
    """Mean of a vLLM histogram since the engine started; None before its first observation."""
    count = sums.get(histogram + "_count")
    total = sums.get(histogram + "_sum")
    return total / count if count and total is not None and count > 0 else None


# What parse_vllm_metrics reads, by sample name, and counters' family names (TYPE lines, samples
# written without _total). A real vLLM body is mostly histogram buckets and http_ and python_
# families (about 400 samples, 45 kB), which prometheus_client's pure-Python parser takes some
# 7 ms to read: 16 engines every 2 s were 6 % of a core (docs/benchmarks.md). These lines: 0.3 ms.
_READ_NAMES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens",
        "vllm:generation_tokens_total",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:request_prompt_tokens_count",
        "vllm:request_prompt_tokens_sum",
        "vllm:request_generation_tokens_count",
        "vllm:request_generation_tokens_sum",
        *(f"{name}{suffix}" for names in _LATENCY_HISTOGRAMS.values() for name in names
          for suffix in ("", "_bucket", "_sum", "_count")),
    }
)


def _lines_read(text: str) -> str:
    """The lines (samples, HELP and TYPE) of the metrics in _READ_NAMES; empty when there are none."""
    kept = []
    for line in text.splitlines():
        words = line.split(None, 3)
        if not words:
            continue
        if words[0] == "#":
            name = words[2] if len(words) > 2 and words[1] in ("HELP", "TYPE") else ""
        else:
            name = words[0].split("{", 1)[0]
        if name in _READ_NAMES:
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


_TOKEN_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def _option(argv: list[str], name: str) -> str | None:
    """The last value given, as argparse takes it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _positional(args: list[str]) -> str | None:
    """The first argument that is not an option or an option's value (`--opt value`)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = "=" not in arg
            continue
        return arg
    return None


def parse_vllm_command(argv: list[str]) -> EngineCommand | None:
    """`vllm serve MODEL ...` or `python -m vllm.entrypoints.openai.api_server --model M ...`;
    None for anything else (including vLLM's own EngineCore children)."""
    model = None
    if "vllm.entrypoints.openai.api_server" in argv:
        model = _option(argv, "--model")
    else:
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "vllm" and argv[i + 1] == "serve":
                model = _positional(argv[i + 2 :]) or _option(argv, "--model")
                break
        else:
            return None
    port_text = _option(argv, "--port")
    try:
        port = int(port_text) if port_text is not None else DEFAULT_PORT
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    return EngineCommand(port, model, _option(argv, "--served-model-name"))
