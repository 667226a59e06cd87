"""Does MPS pay off on this GPU? A verdict from what the agent already sees.

The estimate is the throughput of two engines sharing the GPU under MPS over one engine alone,
minus 1, for the workload the GPU's engines run: model size (from the model's name), prompt length
and prefill share (from vLLM's counters), and whether the engines are CPU-bound. Its coefficients
are fitted by benchmarks/mps_gain/fit.py on measurements from an H200 (docs/mps-gain.md), and
checked there on configurations the fit did not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

from mpswatch.snapshot import EngineState, GpuState

PAYS_OFF, MARGINAL, LIKELY_SLOWER = "pays_off", "marginal", "likely_slower"
VERDICTS = (PAYS_OFF, MARGINAL, LIKELY_SLOWER)
PAYS_OFF_FROM = 0.20  # at least +20 % throughput: worth a second engine's memory and operations
SLOWER_BELOW = 0.0


@dataclass(frozen=True)
class GainModel:
    """Two engines gain from sharing a GPU in two ways, and the larger one counts:
    GPU overlap, one engine's kernels filling SMs the other leaves idle, which shrinks with model
    size and context and differs for prefill:
        intercept + per_log2_params·log2(B params) + per_log2_context·log2(prompt/128) + prefill·share;
    idle-time overlap, one engine's kernels running while the other leaves the GPU idle (CPU work:
    scheduling, sampling), from the share g of time one engine alone keeps the GPU busy:
        idle_overlap·min(1, (1 − g)/g).
    The second is read from the GPU (NVML's coarse utilisation), not from the engine's threads, which
    spin while they wait for the GPU in some engines. The estimate is clamped to [floor, ceiling]."""

    intercept: float
    per_log2_params: float
    per_log2_context: float
    prefill: float
    idle_overlap: float
    floor: float = -0.5
    ceiling: float = 1.5

    def estimate(self, params_billion: float, prompt_tokens: float, prefill_share: float,
                 busy_alone: float | None) -> float:
        gain = (self.intercept + self.per_log2_params * math.log2(params_billion)
                + self.per_log2_context * math.log2(max(prompt_tokens, 1.0) / 128) + self.prefill * prefill_share)
        if busy_alone is not None and busy_alone < 1:
            gain = max(gain, self.idle_overlap * min(1.0, (1 - busy_alone) / max(busy_alone, 1e-3)))
        return min(max(gain, self.floor), self.ceiling)


def busy_alone(utilization: float | None, engines: int) -> float | None:
    """Share of time one engine alone would keep the GPU busy, from the share of time any kernel ran
    with `engines` engines on it, taking their idle times as independent: idle = idle_alone^engines."""
    if utilization is None or not 0 <= utilization <= 1 or engines < 1:
        return None
    return 1 - float((1 - utilization) ** (1 / engines))


# fitted by `python3 -m benchmarks.mps_gain.fit` on the training configurations of the H200 run
# (docs/mps-gain.md; tests/test_advisor.py checks that these are what the fit gives)
MODEL = GainModel(intercept=0.187, per_log2_params=-0.0131, per_log2_context=-0.0097, prefill=-0.023,
                  idle_overlap=0.9721)


@dataclass(frozen=True)
class Advice:
    gpu_uuid: str
    engines: int  # engines up on the GPU
    verdict: str | None  # None: not enough known to judge
    gain_estimate: float | None
    reasons: tuple[str, ...]
    recommendations: tuple[str, ...]


def verdict_of(gain: float) -> str:
    if gain >= PAYS_OFF_FROM:
        return PAYS_OFF
    return MARGINAL if gain >= SLOWER_BELOW else LIKELY_SLOWER


def workload(engines: list[EngineState]) -> tuple[float | None, float | None, float | None]:
    """(params in billions, prompt tokens per request, prefill share) over the engines, weighted by
    their token counts; None where no engine tells, or tells nonsense (not finite, negative)."""
    sized = [e.model_parameters for e in engines if _usable(e.model_parameters) and e.model_parameters > 0]
    params = max(sized) / 1e9 if sized else None  # the largest decides how full the GPU already is
    prompts = [(e.prompt_tokens_per_request, (e.prompt_tokens_total or 0) + (e.generation_tokens_total or 0))
               for e in engines if _usable(e.prompt_tokens_per_request) and e.prompt_tokens_per_request > 0]
    shares = [(e.prompt_tokens_total / (e.prompt_tokens_total + e.generation_tokens_total),
               e.prompt_tokens_total + e.generation_tokens_total)
              for e in engines if _usable(e.prompt_tokens_total) and _usable(e.generation_tokens_total)
              and e.prompt_tokens_total + e.generation_tokens_total > 0]
    return params, _weighted(prompts), _weighted(shares)


def _usable(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value) and value >= 0


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    if not pairs:
        return None
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def advise(gpu: GpuState, engines: list[EngineState], imbalance: float | None = None,
           model: GainModel = MODEL) -> Advice:
    uuid = gpu.uuid or str(gpu.index)
    up = [e for e in engines if e.up]
    if not up:
        return Advice(uuid, 0, None, None, ("no engine answers on this GPU",), ())
    params, prompt, share = workload(up)
    missing = [what for what, value in (("model size (the model's name states none)", params),
                                        ("prompt length (no finished request yet)", prompt),
                                        ("prefill share (no token counters)", share)) if value is None]
    if params is None or prompt is None or share is None:
        return Advice(uuid, len(up), None, None, tuple(f"unknown: {m}" for m in missing), ())
    busy = busy_alone(gpu.utilization_ratio, len(up))
    gain = model.estimate(params, prompt, share, busy)
    verdict = verdict_of(gain)
    idle = "GPU busy time unknown" if busy is None else f"one engine alone keeps the GPU busy {busy:.0%} of the time"
    reasons = [f"{params:g}B parameters, {prompt:.0f}-token prompts, {share:.0%} of tokens in prefill, {idle}"
               f": two engines under MPS estimated at {gain:+.0%} over one alone"]
    if gpu.sm_active_ratio is not None:
        reasons.append(f"SM active {gpu.sm_active_ratio:.0%}, DRAM bandwidth {_pct(gpu.dram_bandwidth_ratio)} now")
    attached = [e for e in up if e.mps_attached]
    alone = [e for e in up if e.mps_attached is False]
    recommendations = []
    if any(e.cpu_bound for e in up):
        recommendations.append("an engine is CPU-bound: enable vLLM's async scheduling (--async-scheduling), "
                               "which overlaps its CPU work with its own GPU work")
    if len(up) == 1 and verdict == PAYS_OFF:
        memory = up[0].gpu_memory_utilization
        room = "" if memory is None or memory <= 0.5 else (
            f" (its gpu_memory_utilization is {memory:g}: give each engine at most 0.45)")
        recommendations.append("add a second engine on this GPU under MPS" + room)
    if len(up) >= 2 and verdict == LIKELY_SLOWER:
        recommendations.append("drop to one engine on this GPU: sharing it costs throughput for this workload")
    if len(up) >= 2 and alone and verdict != LIKELY_SLOWER:
        recommendations.append(f"{len(alone)} engine(s) run without MPS: start them with the control daemon's "
                               "CUDA_MPS_PIPE_DIRECTORY so they overlap instead of time-slicing")
    if len(attached) >= 2 and imbalance is not None and imbalance > 1.3:
        recommendations.append("set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per engine (e.g. 100/number of engines) "
                               "so the busiest engine cannot take the SMs from the others")
    return Advice(uuid, len(up), verdict, gain, tuple(reasons), tuple(recommendations))


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def advise_node(gpus: tuple[GpuState, ...], engines: tuple[EngineState, ...],
                imbalance: dict[str, float]) -> list[Advice]:
    """One advice per GPU that has engines."""
    out = []
    for gpu in gpus:
        on_gpu = [e for e in engines if gpu.uuid and e.gpu_uuid == gpu.uuid]
        if on_gpu:
            out.append(advise(gpu, on_gpu, imbalance.get(gpu.uuid or "")))
    return out
