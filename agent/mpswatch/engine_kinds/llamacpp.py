"""llama.cpp's server (`llama-server --metrics`): its /metrics text and its command line."""

from __future__ import annotations

from mpswatch.engine_kinds import EngineCommand, EngineSample
from mpswatch.engine_kinds.commandline import option, port, runs_program
from mpswatch.engine_kinds.reading import counter_names, read_samples

DEFAULT_PORT = 8080


def parse_llamacpp_metrics(text: str) -> EngineSample:
    """Slots processing a request are running, requests deferred for want of a slot are waiting.
    The body names no model and has no KV-cache usage since its gauges were removed (llama.cpp
    PR 13660), nor latency histograms: those are unknown."""
    read = read_samples(text, _READ_NAMES, "llamacpp:")
    return EngineSample(
        model=None,
        requests_running=read.total("llamacpp:requests_processing"),
        requests_waiting=read.total("llamacpp:requests_deferred"),
        prompt_tokens_total=read.total("llamacpp:prompt_tokens_total"),
        generation_tokens_total=read.total("llamacpp:tokens_predicted_total"),
        kv_cache_usage_ratio=None,
        gpu_memory_utilization=None,
        token_series={**read.series("llamacpp:prompt_tokens_total"), **read.series("llamacpp:tokens_predicted_total")},
        rejected=read.rejected,
        kind="llamacpp",
    )


_READ_NAMES = frozenset({
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    *counter_names("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total"),
})


def parse_llamacpp_command(argv: list[str]) -> EngineCommand | None:
    """`llama-server -m MODEL.gguf [--port P] [--alias NAME]` (metrics only with `--metrics`:
    without it the engine is found and shown down with the server's answer)."""
    if not runs_program(argv, "llama-server"):
        return None
    at = port(argv, DEFAULT_PORT, "--port")
    if at is None:
        return None
    model = option(argv, "-m", "--model") or option(argv, "-hf", "--hf-repo")
    return EngineCommand(at, model, option(argv, "-a", "--alias"), "llamacpp")
