"""Engine kinds: one module per kind of inference engine (vLLM, SGLang, llama.cpp's server, TGI), each reading that engine's
metrics text and command line into the one normalised view the engines collector works with."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# why a sample read from an engine was refused: NaN or an infinity; below zero (every value read is a
# count, a total or a ratio); a series (name and labels) given a second time in the same body
REJECT_REASONS = ("not_finite", "negative", "duplicate_series")


class BadMetrics(ValueError):
    """An answer that is not an engine's metrics: an HTTP error, too big, not Prometheus text."""


# the kinds of engine known, in the order a body is recognised by (vLLM first: some vLLM forks also
# export TGI's names, so `tgi_` alone is the weakest sign)
KINDS = ("vllm", "sglang", "llamacpp", "tgi")
AUTO = "auto"  # a configured engine's kind when not named: the one its body's names say

# the latencies an engine may measure for itself, normalised across kinds: time to first token,
# inter-token latency, time queued, end to end (each a histogram in seconds, where the engine has one)
LATENCIES = ("time_to_first_token", "inter_token", "queue", "end_to_end")


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram as an engine exports it, summed over its label sets: upper bounds in
    seconds (the last +Inf) with the count of observations at or below each, and their sum."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float


@dataclass(frozen=True)
class EngineSample:
    """One scrape, normalised; None where the body does not say."""

    model: str | None
    requests_running: float | None
    requests_waiting: float | None
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    kv_cache_usage_ratio: float | None
    gpu_memory_utilization: float | None
    token_series: Mapping[tuple[Any, ...], float] = field(default_factory=dict)  # each token counter series on its own
    prompt_tokens_per_request: float | None = None
    generation_tokens_per_request: float | None = None
    rejected: Mapping[str, int] = field(default_factory=dict)  # samples refused, by reason (REJECT_REASONS)
    kind: str = "vllm"  # which engine kind's names the body had (vllm, sglang, llamacpp, tgi)
    preemptions_total: float | None = None  # requests the engine preempted (vLLM's counter; other kinds have none)
    latencies: Mapping[str, Histogram] = field(default_factory=dict)  # by LATENCIES name; absent: unknown


@dataclass(frozen=True)
class EngineCommand:
    """What an engine found by its command line serves, and on which port (where it can be reached
    is read from its sockets: mpswatch.netns)."""

    port: int
    model: str | None
    served_name: str | None
    kind: str = "vllm"  # the engine kind its command line runs (KINDS)

    @property
    def name(self) -> str:
        base = self.served_name or (self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else self.kind)
        return f"{base}:{self.port}"


_PARAMETERS_IN_NAME = re.compile(r"(?<![\d.])(\d{1,4}(?:\.\d{1,3})?)\s?([BbMm])(?![a-zA-Z0-9])")
# mixture of experts: `8x7B`, active counts `-A3B`, expert counts `-16E`
_MIXTURE = re.compile(r"\d+x\d|-A\d+(?:\.\d+)?B(?![a-z0-9])|-\d+E(?![a-z0-9])", re.IGNORECASE)


def parameters_from_model_name(model: str | None) -> float | None:
    """Parameter count as a model's name or path states it (`Qwen/Qwen2.5-1.5B-Instruct`,
    `/models/llama-3.1-8b`, `SmolLM2-360M`); None when it states none, or two (`-7B-...-3B`).
    Billions win over millions (`Qwen2.5-7B-Instruct-1M` is a 7B model with a 1M context).
    Mixture-of-experts names state total or active counts that do not size the GPU work alike:
    refused (some, like gpt-oss-20b, do not say they are one)."""
    if not model or _MIXTURE.search(model):
        return None
    found = _PARAMETERS_IN_NAME.findall(model.rstrip("/").rsplit("/", 1)[-1])
    billions = [float(n) for n, unit in found if unit in "Bb"]
    millions = [float(n) for n, unit in found if unit in "Mm"]
    if len(billions) == 1:
        value = billions[0] * 1e9
    elif not billions and len(millions) == 1:
        value = millions[0] * 1e6
    else:
        return None
    return value if value > 0 else None
