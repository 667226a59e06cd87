"""SGLang (`--enable-metrics`): its /metrics text, across versions' names and label sets, and its
command line (`python -m sglang.launch_server`)."""

from __future__ import annotations

from mpswatch.engine_kinds import EngineCommand, EngineSample
from mpswatch.engine_kinds.commandline import option, port
from mpswatch.engine_kinds.reading import BodySamples, Labels, counter_names, histogram_names, latencies, read_samples

DEFAULT_PORT = 30000
_RANKS = ("tp_rank", "pp_rank")


def _canonical(name: str) -> str:
    """Behind some routers and sidecars SGLang's names arrive with `_` for `:` (`sglang_num_running_reqs`)."""
    return "sglang:" + name[7:] if name.startswith("sglang_") else name


def _first_rank(labels: Labels) -> bool:
    """Tensor- and pipeline-parallel ranks of one replica report the same batch and the same KV pool:
    only rank 0's series are read (no rank label: the only one). Other label sets (models, data-parallel
    ranks, `engine_type`, a router's `worker_addr`) are separate work, and are added up."""
    return all(labels.get(rank, "0") == "0" for rank in _RANKS)


def parse_sglang_metrics(text: str) -> EngineSample:
    """The scheduler's gauges (running, queued, KV pool), the tokenizer's token counters and the
    latency histograms. KV usage is the physical measure where the version has it (`kv_used_tokens`
    over the pool's `max_total_num_tokens`, or over used + available + evictable), else `token_usage`
    (which newer versions report as the largest of several pools' usage), averaged over label sets."""
    read = read_samples(text, _READ_NAMES, "sglang:", canonical=_canonical, wanted=_first_rank)
    return EngineSample(
        model=read.label("model_name") or read.label("name"),  # `name` until early 2025
        requests_running=read.total("sglang:num_running_reqs"),
        requests_waiting=read.total("sglang:num_queue_reqs"),
        prompt_tokens_total=read.total("sglang:prompt_tokens_total"),
        generation_tokens_total=read.total("sglang:generation_tokens_total"),
        kv_cache_usage_ratio=_kv_usage(read),
        gpu_memory_utilization=None,  # SGLang's --mem-fraction-static is not in its metrics
        token_series={**read.series("sglang:prompt_tokens_total"), **read.series("sglang:generation_tokens_total")},
        rejected=read.rejected,
        kind="sglang",
        latencies=latencies(read, _LATENCIES),
    )


def _kv_usage(read: BodySamples) -> float | None:
    used = read.total("sglang:kv_used_tokens")
    if used is not None:
        capacity = read.total("sglang:max_total_num_tokens")
        available, evictable = read.total("sglang:kv_available_tokens"), read.total("sglang:kv_evictable_tokens")
        if capacity is None and available is not None:
            capacity = used + available + (evictable or 0.0)
        if capacity:
            return min(1.0, used / capacity)
    if read.has("sglang:kv_used_tokens"):  # the physical measure was refused: unknown, not the logical one
        return None
    return read.mean("sglang:token_usage")


_LATENCIES = {
    "time_to_first_token": ("sglang:time_to_first_token_seconds",),
    "inter_token": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    "end_to_end": ("sglang:e2e_request_latency_seconds",),
}
_READ_NAMES = frozenset({
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:kv_used_tokens",
    "sglang:kv_available_tokens",
    "sglang:kv_evictable_tokens",
    "sglang:max_total_num_tokens",
    *counter_names("sglang:prompt_tokens_total", "sglang:generation_tokens_total"),
    *histogram_names(*(family for families in _LATENCIES.values() for family in families)),
})


def parse_sglang_command(argv: list[str]) -> EngineCommand | None:
    """`python -m sglang.launch_server --model-path M [--port P] [--served-model-name N]`."""
    if not any(argv[i : i + 2] == ["-m", "sglang.launch_server"] for i in (1, 2)):  # after the interpreter (or a script)
        return None
    at = port(argv, DEFAULT_PORT, "--port")
    if at is None:
        return None
    return EngineCommand(at, option(argv, "--model-path", "--model"), option(argv, "--served-model-name"), "sglang")
