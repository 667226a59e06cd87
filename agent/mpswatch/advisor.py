"""Does MPS pay off on this GPU, and is it the best way to run a second engine? A verdict from what
the agent already sees.

The estimates are the throughput of two engines sharing the GPU, under MPS and time-sliced (no MPS),
over one engine alone, minus 1, for the workload the GPU's engines run: model size (from the model's
name), prompt length and prefill share (from vLLM's counters), and how much of the time one engine
leaves the GPU idle. The ways to run a second engine (none, time-sliced, MPS, and MPS with a thread
split where a measured split beat the default) are compared; the best for throughput is given with
its latency price, measured in the nearest regime. The coefficients are fitted by
benchmarks/mps_gain/fit.py on measurements from an H200 and an H100 (docs/mps-gain.md), and checked
there on configurations the fit did not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

from mpswatch.snapshot import EngineState, GpuState

PAYS_OFF, MARGINAL, LIKELY_SLOWER = "pays_off", "marginal", "likely_slower"
# the ways to run a second engine on the GPU, as the advisor compares them
NONE, TIME_SLICED, MPS, MPS_THREAD_SPLIT = "none", "time_sliced", "mps", "mps_thread_split"
MODES = (NONE, TIME_SLICED, MPS, MPS_THREAD_SPLIT)
VERDICTS = (PAYS_OFF, MARGINAL, LIKELY_SLOWER)
PAYS_OFF_FROM = 0.20  # at least +20 % throughput: worth a second engine's memory and operations
SLOWER_BELOW = 0.0


@dataclass(frozen=True)
class GainModel:
    """Two engines gain from sharing a GPU in two ways, and the larger one counts; one model for each
    way of sharing (MPS, time-sliced), with its own coefficients:
    GPU overlap, one engine's kernels filling SMs the other leaves idle (under MPS), or the cost or
    gain of switching contexts between two GPU-bound engines (time-sliced), which changes with model
    size and context and differs for prefill:
        intercept + per_log2_params·log2(B params) + per_log2_context·log2(prompt/128) + prefill·share;
    idle-time overlap, one engine's kernels running while the other leaves the GPU idle (CPU work:
    scheduling, sampling), from the share g of time one engine alone keeps the GPU busy:
        idle_share·min(1, (1 − g)/g), idle_share = idle_overlap + idle_per_log2_params·log2(B params)
        + idle_per_log2_context·log2(prompt/128) + idle_per_prefill·share, held to [0, 1]:
    the share of the ideal (+100 %) a second engine fills, which falls with the length of a GPU step
    (measured time-sliced: about all of it for 0.5B at 512, half for 1.5B at 1024) and, for engines
    that prefill, with the long prefill steps that hold the GPU while the other engine waits (issue 21,
    round four: fitted only where CPU-held prefill rows were trained on, else 0). The idle time is
    read from the GPU (NVML's coarse utilisation), not from the engine's threads, which spin while
    they wait for the GPU in some engines. The estimate is clamped to [floor, ceiling]."""

    intercept: float
    per_log2_params: float
    per_log2_context: float
    prefill: float
    idle_overlap: float
    idle_per_log2_params: float = 0.0
    idle_per_log2_context: float = 0.0
    idle_per_prefill: float = 0.0
    floor: float = -0.5
    ceiling: float = 1.5

    def idle_share(self, params_billion: float, prompt_tokens: float, prefill_share: float) -> float:
        share = (self.idle_overlap + self.idle_per_log2_params * math.log2(params_billion)
                 + self.idle_per_log2_context * math.log2(max(prompt_tokens, 1.0) / 128)
                 + self.idle_per_prefill * prefill_share)
        return min(max(share, 0.0), 1.0)

    def estimate(self, params_billion: float, prompt_tokens: float, prefill_share: float,
                 busy_alone: float | None) -> float:
        gain = (self.intercept + self.per_log2_params * math.log2(params_billion)
                + self.per_log2_context * math.log2(max(prompt_tokens, 1.0) / 128) + self.prefill * prefill_share)
        if busy_alone is not None and busy_alone < 1:
            idle = min(1.0, (1 - busy_alone) / max(busy_alone, 1e-3))
            gain = max(gain, self.idle_share(params_billion, prompt_tokens, prefill_share) * idle)
        return min(max(gain, self.floor), self.ceiling)


@dataclass(frozen=True)
class LatencyPrice:
    """Measured in one regime (the H100 sweeps, docs/mps-gain.md): engine 0's inter-token latency p50
    and p99 with two engines, over its own alone, time-sliced and under MPS (mean over repeats); and
    its time to first token likewise where the workload prefills (None where it does not)."""

    params_billion: float
    context: int
    prefill: bool  # the prefill-heavy workload (prompts prefilled every 16 tokens); else decode-heavy
    busy_alone: float
    cpu_work_ms: float
    time_sliced_p50: float
    time_sliced_p99: float
    mps_p50: float
    mps_p99: float
    ttft_time_sliced_p50: float | None = None
    ttft_time_sliced_p99: float | None = None
    ttft_mps_p50: float | None = None
    ttft_mps_p99: float | None = None


@dataclass(frozen=True)
class SplitResult:
    """Measured in one regime: the MPS thread split (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per engine)
    that beat the default 100/100 outside the spread of both over repeats, by how much (gain of the
    total throughput over one engine alone, in ratio), and the worse of its two engines' ITL p50 and
    p99 over the default's worse; split None (and the rest 0 and None) where no split beat it."""

    params_billion: float
    context: int
    busy_alone: float
    cpu_work_ms: float
    split: str | None
    gain_over_default: float
    itl_p50_ratio: float | None
    itl_p99_ratio: float | None
    prefill: bool = False  # measured with the prefill-heavy workload; else decode-heavy


@dataclass(frozen=True)
class ModeEstimate:
    mode: str
    gain: float  # throughput of the two engines (one for none) over one alone, minus 1
    itl_p50_ratio: float | None  # the engines' inter-token latency over one engine alone's, measured
    itl_p99_ratio: float | None  # in the nearest regime; None: not measured
    split: str | None = None  # MPS_THREAD_SPLIT only: the thread percentages, e.g. 50/50
    error_pp: float | None = None  # the largest held-out error of this mode's estimate, points
    ttft_p50_ratio: float | None = None  # time to first token over one engine alone's, measured in the
    ttft_p99_ratio: float | None = None  # nearest prefill-heavy regime; None: not measured
    measured_in: LatencyPrice | None = None  # the regime the latency ratios were measured in


def busy_alone(utilization: float | None, engines: int) -> float | None:
    """Share of time one engine alone would keep the GPU busy, from the share of time any kernel ran
    with `engines` engines on it, taking their idle times as independent: idle = idle_alone^engines."""
    if utilization is None or not 0 <= utilization <= 1 or engines < 1:
        return None
    return 1 - float((1 - utilization) ** (1 / engines))


# mps-gain-fit:start (python3 -m benchmarks.mps_gain.fit --write-advisor writes this block; do not edit)
# fitted on the training configurations of the H200 run and the H100 sweeps (docs/mps-gain.md;
# tests/test_advisor.py checks that this block is the fit's); idle_per_prefill is left out (0):
# no CPU-held prefill-heavy row is trained on
MODEL = GainModel(intercept=0.1778, per_log2_params=-0.0091, per_log2_context=-0.0113, prefill=-0.0069, idle_overlap=1.2237,
                  idle_per_log2_params=0.0349, idle_per_log2_context=-0.1274)
TIME_SLICED_MODEL = GainModel(intercept=0.0688, per_log2_params=-0.033, per_log2_context=-0.0064, prefill=-0.0362,
                              idle_overlap=0.845, idle_per_log2_params=-0.288, idle_per_log2_context=-0.0505)
# measured in the sweeps, derived from their rows: params, prompt length, prefill-heavy, busy share
# alone, CPU ms a step, ITL p50 and p99 over alone's time-sliced, then under MPS, and where it
# prefills TTFT p50 and p99 over alone's likewise
LATENCY_PRICES: tuple[LatencyPrice, ...] = (
    LatencyPrice(0.494, 512, False, 0.94, 0.0, 1.867, 1.803, 1.845, 1.84),
    LatencyPrice(0.494, 512, False, 0.72, 0.5, 1.43, 1.372, 1.467, 1.724),
    LatencyPrice(0.494, 512, False, 0.58, 1.0, 1.156, 0.78, 1.237, 0.918),
    LatencyPrice(0.494, 512, False, 0.495, 1.5, 0.999, 0.791, 1.08, 0.947),
    LatencyPrice(0.494, 512, False, 0.43, 2.0, 0.999, 1.006, 1.052, 1.117),
    LatencyPrice(0.494, 512, False, 0.335, 3.0, 0.997, 1.011, 1.046, 1.148),
    LatencyPrice(0.494, 512, False, 0.27, 4.0, 0.995, 0.953, 1.035, 1.067),
    LatencyPrice(0.494, 2048, False, 0.89, 0.0, 1.797, 1.032, 1.973, 1.233),
    LatencyPrice(0.494, 2048, False, 0.565, 1.0, 1.207, 0.927, 1.411, 1.254),
    LatencyPrice(0.494, 2048, False, 0.445, 2.0, 0.99, 0.882, 1.124, 1.182),
    LatencyPrice(0.494, 2048, False, 0.3, 4.0, 0.994, 0.9, 1.072, 0.997),
    LatencyPrice(1.544, 512, False, 0.935, 0.0, 1.981, 1.539, 1.632, 1.241),
    LatencyPrice(1.544, 512, False, 0.695, 1.0, 1.64, 1.641, 1.328, 1.302),
    LatencyPrice(1.544, 512, False, 0.545, 2.0, 1.506, 1.655, 1.148, 1.38),
    LatencyPrice(1.544, 512, False, 0.395, 4.0, 1.174, 1.23, 1.038, 1.175),
    LatencyPrice(1.544, 1024, False, 0.95, 0.0, 2.024, 2.008, 1.843, 2.21),
    LatencyPrice(1.544, 1024, False, 0.815, 0.5, 1.739, 1.732, 1.625, 1.621),
    LatencyPrice(1.544, 1024, False, 0.705, 1.0, 1.625, 1.796, 1.452, 1.467),
    LatencyPrice(1.544, 1024, False, 0.63, 1.5, 1.547, 1.403, 1.326, 1.292),
    LatencyPrice(1.544, 1024, False, 0.565, 2.0, 1.499, 1.529, 1.223, 1.436),
    LatencyPrice(1.544, 1024, False, 0.47, 3.0, 1.413, 1.469, 1.095, 1.389),
    LatencyPrice(1.544, 1024, False, 0.41, 4.0, 1.353, 1.38, 1.091, 1.639),
    LatencyPrice(0.494, 512, True, 0.925, 0.0, 1.829, 1.614, 1.678, 1.893, 2.171, 1.246, 1.798, 0.975),
    LatencyPrice(0.494, 512, True, 0.52, 2.0, 1.019, 1.151, 1.102, 1.917, 1.954, 1.343, 1.677, 1.984),
)
# params, prompt length, busy share alone, CPU ms a step, the split that beat 100/100, by how much,
# its ITL p50 and p99 ratios, and whether prefill-heavy (left out: decode-heavy)
SPLITS: tuple[SplitResult, ...] = (
    SplitResult(0.494, 512, 0.495, 1.5, None, 0.0, None, None),
    SplitResult(0.494, 512, 0.94, 0.0, "50/50", 0.1047, 0.897, 1.038),
)
# the largest absolute error of each mode's estimate over the held-out rows, in points
HELD_OUT_ERROR_PP: dict[str, float] = {"mps": 32.1, "time_sliced": 35.4}
# mps-gain-fit:end
SPLIT_SIZE_RANGE = 2.0  # a split measured for one model size and prompt length is applied within this factor of each,
SPLIT_BUSY_RANGE = 0.1  # and this far from the busy share it was measured at: only in that regime


@dataclass(frozen=True)
class Advice:
    gpu_uuid: str
    engines: int  # engines up on the GPU
    verdict: str | None  # None: not enough known to judge
    gain_estimate: float | None
    reasons: tuple[str, ...]
    recommendations: tuple[str, ...]
    best_mode: str | None = None  # MODES: the best way to run a second engine for throughput; None: unknown
    options: tuple[ModeEstimate, ...] = ()  # every way compared, best first


PREFILL_HEAVY_FROM = 0.5  # a prefill share from which an engine's regime is the prefill-heavy workload's
# time-slicing is recommended over MPS that engines run under only when estimated ahead by more than the
# width within which docs/mps-gain.md scores measured gains as a tie (MPSTimeSlicingBetter: the same)
SWITCH_MARGIN = 0.03
QUIET_AFTER_SECONDS = 600.0  # engines that served nothing this long leave the GPU idle for want of requests
MEASURED_PARAMS = (0.49, 7.7)  # billions: Qwen2.5 0.5B to 7B, as measured (docs/mps-gain.md)
MEASURED_PROMPTS = (128, 8192)  # tokens a prompt


def nearest_price(params_billion: float, prompt_tokens: float, prefill_share: float, busy: float | None,
                  prices: tuple[LatencyPrice, ...] = LATENCY_PRICES) -> LatencyPrice | None:
    """The measured regime of the engine's workload (prefill-heavy or decode-heavy, where measured)
    nearest in model size and prompt length (log scale, summed), then in busy share; None when the
    busy share is unknown or nothing was measured."""
    if busy is None or not prices:
        return None
    kind = [p for p in prices if p.prefill == (prefill_share >= PREFILL_HEAVY_FROM)] or list(prices)
    nearest = min(_distance(p, params_billion, prompt_tokens) for p in kind)
    same = [p for p in kind if _distance(p, params_billion, prompt_tokens) == nearest]
    return min(same, key=lambda p: abs(p.busy_alone - busy))


def _distance(regime: LatencyPrice | SplitResult, params_billion: float, prompt_tokens: float) -> float:
    """How far a measured regime's model and prompt length lie from an engine's: doublings of each, summed."""
    return round(abs(math.log2(regime.params_billion / params_billion))
                 + abs(math.log2(regime.context / max(prompt_tokens, 1.0))), 6)


def measured_split(params_billion: float, prompt_tokens: float, prefill_share: float, busy: float | None,
                   splits: tuple[SplitResult, ...] = SPLITS) -> SplitResult | None:
    """The split measured in the nearest regime (the engine's workload kind, busy share within
    SPLIT_BUSY_RANGE, model size and prompt length each within SPLIT_SIZE_RANGE of the measured ones;
    nearest in size and prompt length, then busy share), if it beat the default there; None otherwise:
    no split is advised where none was measured."""
    near = [s for s in splits if _in_regime(s, params_billion, prompt_tokens, prefill_share, busy)]
    if not near:
        return None
    found = min(near, key=lambda s: (_distance(s, params_billion, prompt_tokens), abs(s.busy_alone - busy)))  # type: ignore[operator]
    return found if found.split is not None else None


def _in_regime(split: SplitResult, params_billion: float, prompt_tokens: float, prefill_share: float,
               busy: float | None) -> bool:
    """Whether a split was measured near enough to this workload to speak for it."""
    return (busy is not None and abs(split.busy_alone - busy) <= SPLIT_BUSY_RANGE
            and split.prefill == (prefill_share >= PREFILL_HEAVY_FROM)
            and abs(math.log2(split.params_billion / params_billion)) <= math.log2(SPLIT_SIZE_RANGE)
            and abs(math.log2(split.context / max(prompt_tokens, 1.0))) <= math.log2(SPLIT_SIZE_RANGE))


def compare(params_billion: float, prompt_tokens: float, prefill_share: float, busy: float | None,
            model: GainModel = MODEL, ts_model: GainModel = TIME_SLICED_MODEL,
            prices: tuple[LatencyPrice, ...] = LATENCY_PRICES, splits: tuple[SplitResult, ...] = SPLITS,
            errors: dict[str, float] | None = None) -> tuple[ModeEstimate, ...]:
    """The ways to run a second engine, best for throughput first: none (one engine: gain 0, its own
    latency), time-sliced, MPS, and MPS with a thread split where one was measured to beat the default.
    Latency ratios are the nearest measured regime's; on a tie the simpler way comes first."""
    errors = HELD_OUT_ERROR_PP if errors is None else errors
    price = nearest_price(params_billion, prompt_tokens, prefill_share, busy, prices)
    ts_itl, ts_ttft, mps_itl, mps_ttft = _ratios(price)
    mps = model.estimate(params_billion, prompt_tokens, prefill_share, busy)
    alone_ttft = 1.0 if price is not None and price.prefill else None
    options = [ModeEstimate(NONE, 0.0, 1.0, 1.0, ttft_p50_ratio=alone_ttft, ttft_p99_ratio=alone_ttft),
               ModeEstimate(TIME_SLICED, ts_model.estimate(params_billion, prompt_tokens, prefill_share, busy),
                            *ts_itl, error_pp=errors.get(TIME_SLICED), ttft_p50_ratio=ts_ttft[0], ttft_p99_ratio=ts_ttft[1],
                            measured_in=price),
               ModeEstimate(MPS, mps, *mps_itl, error_pp=errors.get(MPS), ttft_p50_ratio=mps_ttft[0],
                            ttft_p99_ratio=mps_ttft[1], measured_in=price)]
    split = measured_split(params_billion, prompt_tokens, prefill_share, busy, splits)
    if split is not None:
        options.append(ModeEstimate(
            MPS_THREAD_SPLIT, min(mps + split.gain_over_default, model.ceiling),
            _times(mps_itl[0], split.itl_p50_ratio), _times(mps_itl[1], split.itl_p99_ratio),
            split.split, errors.get(MPS), measured_in=price))
    return tuple(sorted(options, key=lambda o: -o.gain))  # stable: none, time-sliced, MPS on a tie


Pair = tuple[float | None, float | None]


def _ratios(price: LatencyPrice | None) -> tuple[Pair, Pair, Pair, Pair]:
    """ITL and TTFT (p50, p99) over alone's, time-sliced then under MPS; None where not measured."""
    if price is None:
        return (None, None), (None, None), (None, None), (None, None)
    return ((price.time_sliced_p50, price.time_sliced_p99), (price.ttft_time_sliced_p50, price.ttft_time_sliced_p99),
            (price.mps_p50, price.mps_p99), (price.ttft_mps_p50, price.ttft_mps_p99))


def _times(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a * b


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
    return params, _finite(_weighted(prompts)), _finite(_weighted(shares))


def _finite(value: float | None) -> float | None:
    """None for what overflowing counters make of a weighted mean (inf, nan)."""
    return value if value is not None and math.isfinite(value) else None


def _usable(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value) and value >= 0


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    if not pairs:
        return None
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def serving(engine: EngineState) -> bool | None:
    """Whether an engine serves now (tokens over its last interval, or a request running); None: unknown."""
    if (engine.tokens_per_second or 0) > 0 or (engine.requests_running or 0) > 0:
        return True
    return None if engine.tokens_per_second is None else False


def advise(gpu: GpuState, engines: list[EngineState], imbalance: float | None = None,
           model: GainModel = MODEL, ts_model: GainModel = TIME_SLICED_MODEL, quiet: bool = False) -> Advice:
    """`quiet`: every engine on the GPU has served nothing for QUIET_AFTER_SECONDS (derive remembers
    it): the GPU idles for want of requests, which says nothing of how much room the engines leave."""
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
    # the busy time is the serving engines' (an idle one adds none), where it is known which serve
    working = sum(serving(e) is True for e in up)
    busy = None if quiet else busy_alone(gpu.utilization_ratio, working or len(up))
    options = compare(params, prompt, share, busy, model, ts_model)
    # the busy share decides between MPS and time-slicing: without it the estimates are a GPU-bound
    # engine's (the idle-time term can only raise them), and no mode is best
    best = options[0] if busy is not None else None
    by_mode = {o.mode: o for o in options}
    gain = by_mode[MPS].gain
    verdict = verdict_of(gain)
    idle = (f"no engine has served a token for {QUIET_AFTER_SECONDS // 60:.0f} minutes or more, so the GPU's busy "
            "time says nothing of their workload" if quiet else "GPU busy time unknown" if busy is None
            else f"one engine alone keeps the GPU busy {busy:.0%} of the time")
    reasons = [f"{params:g}B parameters, {prompt:.0f}-token prompts, {share:.0%} of tokens in prefill, {idle}"
               f": two engines under MPS estimated at {gain:+.0%} over one alone, "
               f"time-sliced at {by_mode[TIME_SLICED].gain:+.0%}" + (" (GPU-bound estimates)" if best is None else "")]
    reasons.append("best for throughput: " + (describe(best) if best is not None else
                                              "unknown (the GPU's busy time decides between MPS and time-slicing)"))
    if not (MEASURED_PARAMS[0] <= params <= MEASURED_PARAMS[1] and MEASURED_PROMPTS[0] <= prompt <= MEASURED_PROMPTS[1]):
        reasons.append(f"outside what was measured ({MEASURED_PARAMS[0]:g}-{MEASURED_PARAMS[1]:g}B parameters, "
                       f"{MEASURED_PROMPTS[0]:g}-{MEASURED_PROMPTS[1]:g}-token prompts): the estimates extrapolate")
    if gpu.sm_active_ratio is not None:
        reasons.append(f"SM active {gpu.sm_active_ratio:.0%}, DRAM bandwidth {_pct(gpu.dram_bandwidth_ratio)} now")
    attached = [e for e in up if e.mps_attached]
    alone = [e for e in up if e.mps_attached is False]
    if not quiet and up and all(serving(e) is False for e in up):
        reasons.append("no engine served a token in its last interval: the GPU's busy time may show the demand, "
                       "not the room the engines leave")
    mps_best = best is not None and best.mode in (MPS, MPS_THREAD_SPLIT)
    # time-slicing and MPS estimated within SWITCH_MARGIN of each other: either will do
    close = best is not None and best.mode == TIME_SLICED and best.gain - gain <= SWITCH_MARGIN
    recommendations = []
    if any(e.cpu_bound for e in up):
        recommendations.append("an engine is CPU-bound: enable vLLM's async scheduling (--async-scheduling), "
                               "which overlaps its CPU work with its own GPU work")
    if len(up) == 1 and best is not None and best.gain >= PAYS_OFF_FROM:
        memory = up[0].gpu_memory_utilization
        room = "" if memory is None or not math.isfinite(memory) or memory <= 0.5 else (
            f" (its gpu_memory_utilization is {memory:g}: give each engine at most 0.45)")
        how = {MPS: "under MPS", TIME_SLICED: f"without MPS (time-sliced: {best.gain:+.0%} against {gain:+.0%} under MPS"
                                              + (", a tie: either will do)" if close else ")"),
               MPS_THREAD_SPLIT: f"under MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE {best.split} "
                                 f"({best.gain:+.0%} against {gain:+.0%} with the default)"}[best.mode]
        recommendations.append(f"add a second engine on this GPU {how}" + room)
    if len(up) >= 2 and (verdict == LIKELY_SLOWER or (best is not None and best.mode == NONE)):
        recommendations.append("drop to one engine on this GPU: sharing it costs throughput for this workload")
    if len(up) >= 2 and attached and best is not None and best.mode == TIME_SLICED and not close:
        recommendations.append(f"run the engines on this GPU without MPS (time-sliced, CUDA_MPS_PIPE_DIRECTORY unset "
                               f"and no daemon on the default pipe dir): {best.gain:+.0%} estimated against "
                               f"{gain:+.0%} under MPS")
    if len(up) >= 2 and alone and mps_best:
        recommendations.append(f"{len(alone)} engine(s) run without MPS: start them with the control daemon's "
                               "CUDA_MPS_PIPE_DIRECTORY so they overlap instead of time-slicing")
    if len(up) >= 2 and best is not None and best.mode == MPS_THREAD_SPLIT:
        recommendations.append(f"set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE {best.split} per engine: measured "
                               f"{best.gain - gain:+.0%} of throughput over the default in the nearest regime")
    elif len(attached) >= 2 and imbalance is not None and imbalance > 1.3:
        measured = any(s.split is None and _in_regime(s, params, prompt, share, busy) for s in SPLITS)
        recommendations.append("set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per engine (e.g. 100/number of engines) "
                               "so the busiest engine cannot take the SMs from the others"
                               + (": for fairness; in the nearest measured regime no split beat the default's "
                                  "throughput" if measured else ""))
    return Advice(uuid, len(up), verdict, gain, tuple(reasons), tuple(recommendations),
                  None if best is None else best.mode, options)


def describe(option: ModeEstimate) -> str:
    """One mode's estimate, error and latency price, as `advise` says it."""
    name = {NONE: "one engine alone", TIME_SLICED: "two engines time-sliced (no MPS)", MPS: "two engines under MPS",
            MPS_THREAD_SPLIT: f"two engines under MPS with thread split {option.split}"}[option.mode]
    if option.mode == NONE:
        return f"{name} (every way of sharing is estimated to lose throughput)"
    error = "" if option.error_pp is None else f" (held-out error up to {option.error_pp:.0f} points)"
    if option.itl_p50_ratio is None or option.itl_p99_ratio is None:
        price = "latency price not measured for this regime"
    else:
        ttft = ("" if option.ttft_p50_ratio is None or option.ttft_p99_ratio is None else
                f", time to first token x{option.ttft_p50_ratio:.2f} p50, x{option.ttft_p99_ratio:.2f} p99")
        price = (f"inter-token latency x{option.itl_p50_ratio:.2f} p50, x{option.itl_p99_ratio:.2f} p99{ttft} "
                 f"against one engine alone ({measured_in(option.measured_in)})")
    return f"{name}, {option.gain:+.0%}{error}; {price}"


def measured_in(price: LatencyPrice | None) -> str:
    """Where a latency price was measured, for the reader to judge how near the engine it lies."""
    if price is None:
        return "measured in the nearest regime"
    return (f"measured for {price.params_billion:g}B at {price.context}-token prompts, "
            f"{'prefill' if price.prefill else 'decode'}-heavy, one engine alone busy {price.busy_alone:.0%}")


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def advise_node(gpus: tuple[GpuState, ...], engines: tuple[EngineState, ...],
                imbalance: dict[str, float], quiet: frozenset[str] = frozenset()) -> list[Advice]:
    """One advice per GPU that has engines; `quiet`: the GPUs whose engines have long served nothing."""
    out = []
    for gpu in gpus:
        on_gpu = [e for e in engines if gpu.uuid and e.gpu_uuid == gpu.uuid]
        if on_gpu:
            out.append(advise(gpu, on_gpu, imbalance.get(gpu.uuid or ""), quiet=gpu.uuid in quiet))
    return out


class QuietGpus:
    """The GPUs whose engines have all served nothing for QUIET_AFTER_SECONDS: judged over minutes, not
    one engine scrape, so light traffic with a pause does not make the best mode come and go."""

    def __init__(self) -> None:
        self._quiet_since: dict[str, float] = {}

    def update(self, engines: tuple[EngineState, ...], now: float) -> frozenset[str]:
        by_gpu: dict[str, list[bool | None]] = {}
        for e in engines:
            if e.up and e.gpu_uuid:
                by_gpu.setdefault(e.gpu_uuid, []).append(serving(e))
        for uuid in set(self._quiet_since) - set(by_gpu):
            del self._quiet_since[uuid]
        for uuid, states in by_gpu.items():
            if any(states):
                self._quiet_since.pop(uuid, None)
            elif all(state is False for state in states):
                self._quiet_since.setdefault(uuid, now)
            # some unknown (an engine's first interval), none serving: the quiet time goes on as it was
        return frozenset(uuid for uuid, since in self._quiet_since.items() if now - since >= QUIET_AFTER_SECONDS)
