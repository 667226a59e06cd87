"""vLLM: its /metrics text (current names, the older `gpu_cache_usage_perc`, several engines or
models behind one server) and its command lines (`vllm serve`, the OpenAI API-server module)."""

from __future__ import annotations

import os

from mpswatch.engine_kinds import EngineCommand, EngineSample
from mpswatch.engine_kinds.commandline import option, port, positional
from mpswatch.engine_kinds.reading import counter_names, histogram_names, latencies, read_samples, unfit

DEFAULT_PORT = 8000


def parse_vllm_metrics(text: str) -> EngineSample:
    """Sums over vLLM's label sets (several engines or models behind one server: `engine`,
    `model_name`). Knows V0's, early V1's and current names (`gpu_cache_usage_perc` before
    `kv_cache_usage_perc`, `time_per_output_token_seconds` before `inter_token_latency_seconds`);
    refuses text with no vLLM metric. A NaN, an infinity, a negative value or a series given twice
    (which a sum would double) makes that metric unknown, and is counted in `rejected` by reason."""
    read = read_samples(text, _READ_NAMES, "vllm:")
    utilization = None
    for labels in read.labels_seen.get("vllm:cache_config_info", []):
        if "gpu_memory_utilization" not in labels:
            continue
        try:
            value = float(labels["gpu_memory_utilization"])
        except ValueError:
            continue
        reason = unfit(value)
        if reason is not None:
            read.rejected[reason] = read.rejected.get(reason, 0) + 1
            read.refused.add("gpu_memory_utilization")
        else:
            utilization = value
    kv_names = [name for name in _KV_USAGE if read.has(name)]  # the current name first
    return EngineSample(
        model=read.label("model_name"),
        requests_running=read.total("vllm:num_requests_running"),
        requests_waiting=read.total("vllm:num_requests_waiting"),
        prompt_tokens_total=read.total("vllm:prompt_tokens_total"),
        generation_tokens_total=read.total("vllm:generation_tokens_total"),
        kv_cache_usage_ratio=None if not kv_names or read.refused & set(_KV_USAGE) else read.mean(kv_names[0]),
        gpu_memory_utilization=None if "gpu_memory_utilization" in read.refused else utilization,
        token_series={**read.series("vllm:prompt_tokens_total"), **read.series("vllm:generation_tokens_total")},
        prompt_tokens_per_request=read.per_observation("vllm:request_prompt_tokens"),
        generation_tokens_per_request=read.per_observation("vllm:request_generation_tokens"),
        rejected=read.rejected,
        kind="vllm",
        latencies=latencies(read, _LATENCIES),
        preemptions_total=read.total("vllm:num_preemptions_total"),
    )


# Each latency from the first of its histograms the body has (current name first).
_LATENCIES = {
    "time_to_first_token": ("vllm:time_to_first_token_seconds",),
    "inter_token": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "queue": ("vllm:request_queue_time_seconds",),
    "end_to_end": ("vllm:e2e_request_latency_seconds",),
}
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")

# What parse_vllm_metrics reads: a real vLLM body is mostly other histograms' buckets and http_ and
# python_ families (about 400 samples, 45 kB), which the parser takes some 7 ms to read whole.
_READ_NAMES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        *_KV_USAGE,
        "vllm:cache_config_info",
        *counter_names("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total"),
        "vllm:request_prompt_tokens_count",
        "vllm:request_prompt_tokens_sum",
        "vllm:request_generation_tokens_count",
        "vllm:request_generation_tokens_sum",
        *histogram_names(*(family for families in _LATENCIES.values() for family in families)),
    }
)


def parse_vllm_command(argv: list[str]) -> EngineCommand | None:
    """`vllm serve MODEL ...` or `python -m vllm.entrypoints.openai.api_server --model M ...`;
    None for anything else (including vLLM's own EngineCore children)."""
    model = None
    if "vllm.entrypoints.openai.api_server" in argv:
        model = option(argv, "--model")
    else:
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "vllm" and argv[i + 1] == "serve":
                model = positional(argv[i + 2 :]) or option(argv, "--model")
                break
        else:
            return None
    at = port(argv, DEFAULT_PORT, "--port")
    return None if at is None else EngineCommand(at, model, option(argv, "--served-model-name"), "vllm")
