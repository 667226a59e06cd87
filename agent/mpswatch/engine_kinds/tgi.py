"""Hugging Face text-generation-inference (TGI): its router's /metrics text and its launcher's
command line (`text-generation-launcher`)."""

from __future__ import annotations

from mpswatch.engine_kinds import EngineCommand, EngineSample
from mpswatch.engine_kinds.commandline import option, port, runs_program
from mpswatch.engine_kinds.reading import histogram_names, latencies, read_samples

DEFAULT_PORT = 3000


def parse_tgi_metrics(text: str) -> EngineSample:
    """The queue is waiting, the current batch is running. TGI has no token counters: its token
    totals are the sums of the per-request histograms `tgi_request_input_length` (observed when a
    request is validated) and `tgi_request_generated_tokens` (observed when it ends), so their rate
    moves by whole requests, not by tokens as they are made. No model label, no KV-cache usage."""
    read = read_samples(text, _READ_NAMES, "tgi_")
    return EngineSample(
        model=None,
        requests_running=read.total("tgi_batch_current_size"),
        requests_waiting=read.total("tgi_queue_size"),
        prompt_tokens_total=read.total("tgi_request_input_length_sum"),
        generation_tokens_total=read.total("tgi_request_generated_tokens_sum"),
        kv_cache_usage_ratio=None,
        gpu_memory_utilization=None,
        token_series={**read.series("tgi_request_input_length_sum"), **read.series("tgi_request_generated_tokens_sum")},
        prompt_tokens_per_request=read.per_observation("tgi_request_input_length"),
        generation_tokens_per_request=read.per_observation("tgi_request_generated_tokens"),
        rejected=read.rejected,
        kind="tgi",
        latencies=latencies(read, _LATENCIES),
    )


_LATENCIES = {"queue": ("tgi_request_queue_duration",), "end_to_end": ("tgi_request_duration",)}
_READ_NAMES = frozenset({
    "tgi_batch_current_size",
    "tgi_queue_size",
    *histogram_names("tgi_request_input_length", "tgi_request_generated_tokens", *_LATENCIES["queue"],
                     *_LATENCIES["end_to_end"]),
})


def parse_tgi_command(argv: list[str]) -> EngineCommand | None:
    """`text-generation-launcher --model-id M [--port P]` (its router, a child, serves /metrics there)."""
    if not runs_program(argv, "text-generation-launcher"):
        return None
    at = port(argv, DEFAULT_PORT, "--port")
    if at is None:
        return None
    return EngineCommand(at, option(argv, "--model-id"), option(argv, "--served-model-name"), "tgi")
