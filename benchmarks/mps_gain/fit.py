"""Fits the advisor's gain models (agent/mpswatch/advisor.py) on part of the measurements, MPS and
time-sliced, and holds their estimates and the mode they choose against the measured gains of the
rest, through the advisor's own code; derives the latency prices and thread splits it ships from the
H100 sweeps (rounds two and three).

    python3 -m benchmarks.mps_gain.fit [--results H200.json[.gz]] [--sweeps H100.json[.gz] ...] [--write-doc]
        [--write-advisor | --check]

Held out (docs/mps-gain.md states them, committed before this fit was first run): in the H200 run
every 1.5B configuration, every other one at context 512, and the CPU-bound one at 3 ms a step; in the
round-two sweep CPU work 0.5, 1.5 and 3 ms a step for both of its configurations; in round three the
rows ROUND_THREE_HELD_OUT names (committed before its run; round four's plan keeps them). The advisor
is given what the agent saw while one engine ran alone (the GPU's utilisation, the engine's busiest
thread, from the case's recorded signals), the model's name, the prompt length and the prefill share
as the engine's vLLM metrics state them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from mpswatch import advisor
from mpswatch.advisor import (
    MPS,
    MPS_THREAD_SPLIT,
    NONE,
    TIME_SLICED,
    GainModel,
    LatencyPrice,
    SplitResult,
    advise,
    busy_alone,
)
from mpswatch.engine_kinds import parameters_from_model_name
from mpswatch.snapshot import EngineState, GpuState

from benchmarks.mps_gain.report import load_results

ROOT = Path(__file__).resolve().parents[2]

RESULTS = ROOT / "benchmarks" / "mps_gain" / "mps-gain.json.gz"  # the H200 run docs/mps-gain.md reports
SWEEPS = tuple(ROOT / "docs" / "validation" / f"2026-12-05-h100-mps-gain-sweep{part}.json.gz"
               for part in ("", "-r3-decode", "-r3-prefill"))  # issue 21: round two, round three
DOC = ROOT / "docs" / "mps-gain.md"
START, END = "<!-- mps-gain-proof:start -->", "<!-- mps-gain-proof:end -->"
PREFILL_GENERATED = 16  # tokens generated per prompt in the prefill-heavy workload (cases.py)
TIE = advisor.SWITCH_MARGIN  # measured time-sliced and MPS gains this close: either mode counts as the right one
SWEEP_HELD_OUT_MS = (0.5, 1.5, 3.0)  # round two: both configurations at these CPU levels
# round three (docs/mps-gain.md states them, committed before its run): per configuration, the CPU
# levels held out; None: every level
ROUND_THREE_HELD_OUT: dict[tuple[str, int, str], tuple[float, ...] | None] = {
    ("3B", 512, "decode"): None,
    ("1.5B", 512, "decode"): (2.0,),
    ("0.5B", 2048, "decode"): (2.0,),
    ("0.5B", 128, "decode"): (1.0,),
    ("7B", 512, "decode"): (4.0,),
    ("0.5B", 512, "prefill"): (2.0,),
    ("1.5B", 1024, "prefill"): (2.0,),
}
DEFAULT_SPLIT = "100/100"
PREFILL_TEST = ("1.5B", 1024, "prefill", 2.0)  # round four's test of the idle share's prefill term (docs/mps-gain.md)


def held_out(config: dict) -> bool:
    if config["source"] == "sweep":
        key = (config["size"], config["context"], config["workload"])
        if key in ROUND_THREE_HELD_OUT:
            levels = ROUND_THREE_HELD_OUT[key]
            return levels is None or config["cpu_work_ms"] in levels
        return config["cpu_work_ms"] in SWEEP_HELD_OUT_MS
    if config["cpu_work_ms"]:
        return config["cpu_work_ms"] == 3
    return config["size"] == "1.5B" or config["context"] == 512


def _card(name: str) -> str:
    return next((card for card in ("H100", "H200") if card in name), name)


def configurations(results: dict, sweeps: tuple[dict, ...] = (), names: tuple[str, ...] = ()) -> list[dict]:
    """One entry per (card, source, size, context, workload, CPU work) with its measured gains under MPS
    and time-sliced (the mean over repeats, and each repeat's) and what the agent saw in each repeat.
    The source is the first round's run or a sweep (each sweep file apart: a configuration measured in
    two is two entries), its origin "run" or the sweep's name (`names`, else its place)."""
    by_key: dict[tuple, dict[str, dict[int, dict]]] = {}
    for case in results["cases"]:
        key = (_card(results["gpu"]), "run", case["size"], case["context"], case["workload"], case["cpu_work_ms"])
        by_key.setdefault(key, {}).setdefault(case["mode"], {})[0] = case
    for index, sweep in enumerate(sweeps):
        for row in sweep["rows"]:
            if row["split"] != DEFAULT_SPLIT:
                continue
            key = (_card(sweep["gpu"]), f"sweep{index}", row["size"], row["context"], row["workload"], row["cpu_work_ms"])
            by_key.setdefault(key, {}).setdefault(row["mode"], {})[row["repeat"]] = row
    out = []
    order = sorted(by_key.items(),
                   key=lambda kv: (kv[0][0], kv[0][5], float(kv[0][2][:-1]), kv[0][4], kv[0][3], kv[0][1]))
    for (card, source, size, context, workload, cpu_ms), modes in order:
        if not {"alone", "mps", "timesliced"} <= set(modes):
            continue
        alone = modes["alone"]
        repeats = sorted(r for r in alone if r in modes["mps"] and r in modes["timesliced"])
        gains = {mode: [modes[mode][r]["tokens_per_second"] / alone[r]["tokens_per_second"] - 1 for r in repeats]
                 for mode in ("mps", "timesliced")}
        out.append({
            "card": card, "source": "run" if source == "run" else "sweep", "size": size, "context": context,
            "origin": "run" if source == "run" else (names or tuple(f"sweep {i + 1}" for i in range(len(sweeps))))[
                int(source.removeprefix("sweep"))],
            "workload": workload, "cpu_work_ms": cpu_ms,
            "measured": statistics.fmean(gains["mps"]), "measured_ts": statistics.fmean(gains["timesliced"]),
            "gains": gains, "alone": [alone[r].get("signals") for r in repeats],
            "mps": [modes["mps"][r].get("signals") for r in repeats],
        })
    return out


def prefill_share(config: dict) -> float:
    """As the engine's token counters state it: decode-heavy prompts are already cached (cases.py)."""
    if config["workload"] == "decode":
        return 0.0
    return config["context"] / (config["context"] + PREFILL_GENERATED)


def engines_seen(config: dict, signals: dict | None) -> tuple[GpuState, list[EngineState]] | None:
    """The GPU and engine states the advisor would get from the agent in this configuration."""
    if not signals or not signals.get("engines"):
        return None
    share = prefill_share(config)
    engines = []
    for seen in signals["engines"]:
        engines.append(EngineState(
            name=seen["engine"], url=seen["url"] or "", found_by="discovered", up=True, model=seen["model"],
            gpu_uuid=seen["gpu_uuid"], model_parameters=parameters_from_model_name(seen["model"]),
            prompt_tokens_per_request=float(config["context"]),
            prompt_tokens_total=share * 1e6, generation_tokens_total=(1 - share) * 1e6,
            busiest_thread_cpu_ratio=seen.get("mps_engine_busiest_thread_cpu_ratio"),
            gpu_memory_utilization=None,
            cpu_bound=bool(seen.get("mps_engine_cpu_bound")), mps_attached=bool(seen.get("mps_engine_mps_attached")),
        ))
    uuid = engines[0].gpu_uuid
    gpu_seen = next((g for g in signals["gpus"] if g["uuid"] == uuid), {})
    gpu = GpuState(index=int(gpu_seen.get("gpu", 0)), uuid=uuid, name=None, up=True,
                   sm_active_ratio=gpu_seen.get("mps_gpu_sm_active_ratio"),
                   utilization_ratio=gpu_seen.get("mps_gpu_utilization_ratio"),
                   dram_bandwidth_ratio=gpu_seen.get("mps_gpu_dram_bandwidth_ratio"))
    return gpu, engines


def params_billion(config: dict) -> float:
    seen = engines_seen(config, config["alone"][0])
    assert seen is not None, config
    return max(e.model_parameters or 0.0 for e in seen[1]) / 1e9


def features(config: dict) -> tuple[float, float, float, float]:
    return 1.0, math.log2(params_billion(config)), math.log2(config["context"] / 128), prefill_share(config)


def busy(config: dict) -> float:
    """Share of time the GPU was busy with the engine alone (NVML's coarse utilisation), mean over repeats."""
    shares = []
    for signals in config["alone"]:
        seen = engines_seen(config, signals)
        share = busy_alone(seen[0].utilization_ratio, len(seen[1])) if seen else None
        if share is not None:
            shares.append(share)
    return statistics.fmean(shares)


def idle(config: dict) -> float:
    """min(1, (1 − g)/g): the idle-time term's argument."""
    share = busy(config)
    return min(1.0, (1 - share) / share)


def least_squares(rows: list[tuple[float, ...]], targets: list[float]) -> list[float]:
    """Normal equations solved by Gauss-Jordan elimination: a few unknowns, no numpy needed."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * t for r, t in zip(rows, targets))]
         for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-9:
            raise SystemExit(f"the training rows do not determine coefficient {col} (two features move together)")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit(configs: list[dict], prefill_term: bool = True) -> tuple[GainModel, GainModel]:
    """Both models on the training rows: GPU overlap by least squares on those without CPU work; each
    idle share (gain over the idle-time term's argument) by least squares on those with, in log2(params),
    log2(prompt/128) and, where a CPU-held training row prefills, the prefill share (else that
    coefficient is 0: nothing measured says how prefill changes it; or without it, round three's form)."""
    train = [c for c in configs if not held_out(c) and c["alone"][0]]
    gpu_bound = [c for c in train if c["cpu_work_ms"] == 0]
    cpu_held = [c for c in train if c["cpu_work_ms"] > 0]
    if not cpu_held:
        raise SystemExit("no CPU-bound configuration to fit the idle-time overlap on")
    prefills = prefill_term and any(prefill_share(c) for c in cpu_held)
    shape = [(1.0, math.log2(params_billion(c)), math.log2(c["context"] / 128))
             + ((prefill_share(c),) if prefills else ()) for c in cpu_held]
    models = []
    for measured in ("measured", "measured_ts"):
        overlap = least_squares([features(c) for c in gpu_bound], [c[measured] for c in gpu_bound])
        idle_share = least_squares(shape, [c[measured] / idle(c) for c in cpu_held]) + ([] if prefills else [0.0])
        models.append(GainModel(*(round(x, 4) for x in overlap), *(round(x, 4) for x in idle_share)))
    return models[0], models[1]


def _sweep_groups(sweeps: tuple[dict, ...]) -> dict[tuple, dict[int, dict]]:
    """Rows by (size, context, workload, CPU ms, mode, split), then repeat; a later sweep's repeats of
    the same key are numbered after an earlier one's."""
    by: dict[tuple, dict[int, dict]] = {}
    for sweep in sweeps:
        base = {key: max(rows) + 1 for key, rows in by.items()}
        for row in sweep["rows"]:
            key = (row["size"], row["context"], row["workload"], row["cpu_work_ms"], row["mode"], row["split"])
            by.setdefault(key, {})[base.get(key, 0) + row["repeat"]] = row
    return by


def _sweep_busy(row: dict) -> float | None:
    signals = row.get("signals") or {}
    gpu = next(iter(signals.get("gpus") or []), {})
    return busy_alone(gpu.get("mps_gpu_utilization_ratio"), len(signals.get("engines") or []) or 1)


def latency_prices(sweeps: tuple[dict, ...]) -> tuple[LatencyPrice, ...]:
    """Per configuration and CPU level of the sweeps: engine 0's ITL (and TTFT where it prefills) p50/p99
    time-sliced and under MPS over alone's, each the mean over repeats, with the busy share the agent
    saw alone."""
    by = _sweep_groups(sweeps)
    out = []
    for (size, context, workload, ms, mode, split), alone in sorted(
            by.items(), key=lambda kv: (kv[0][2], float(kv[0][0][:-1]), kv[0][1], kv[0][3])):
        if mode != "alone" or split != DEFAULT_SPLIT:
            continue
        shares = [b for row in alone.values() if (b := _sweep_busy(row)) is not None]
        ts, mps = by.get((size, context, workload, ms, "timesliced", DEFAULT_SPLIT)), \
            by.get((size, context, workload, ms, "mps", DEFAULT_SPLIT))
        if not shares or not ts or not mps:
            continue
        prefill = workload == "prefill"
        ttft = [_ratio(rows, alone, key) if prefill else None
                for rows in (ts, mps) for key in ("ttft_p50_s", "ttft_p99_s")]
        out.append(LatencyPrice(next(iter(alone.values()))["params_billion"], context, prefill,
                                round(statistics.fmean(shares), 3), ms,
                                _ratio(ts, alone, "itl_p50_s"), _ratio(ts, alone, "itl_p99_s"),
                                _ratio(mps, alone, "itl_p50_s"), _ratio(mps, alone, "itl_p99_s"), *ttft))
    return tuple(out)


def _ratio(shared: dict[int, dict], alone: dict[int, dict], key: str) -> float:
    """Engine 0's latency `key` shared over alone, each the mean over repeats."""
    return round(statistics.fmean(row[key] for row in shared.values())
                 / statistics.fmean(row[key] for row in alone.values()), 3)


def _worst(rows: dict[int, dict], key: str) -> float:
    """The worse engine's latency `key`, mean over repeats."""
    return max(statistics.fmean(row["per_engine_latency"][i][key] for row in rows.values()) for i in (0, 1))


def measured_splits(sweeps: tuple[dict, ...]) -> tuple[SplitResult, ...]:
    """Per configuration and CPU level where splits were measured: the split with the highest total
    throughput, if it beat the default outside the spread of both over repeats (its lowest repeat above
    the default's highest)."""
    by = _sweep_groups(sweeps)
    out = []
    for config in sorted({k[:4] for k in by if k[5] != DEFAULT_SPLIT},
                         key=lambda k: (float(k[0][:-1]), k[1], k[2], -k[3])):
        alone = by[(*config, "alone", DEFAULT_SPLIT)]
        default = by[(*config, "mps", DEFAULT_SPLIT)]
        alone_tps = statistics.fmean(row["tokens_per_second"] for row in alone.values())
        shares = [b for row in alone.values() if (b := _sweep_busy(row)) is not None]
        params = next(iter(alone.values()))["params_billion"]
        regime = (params, config[1], round(statistics.fmean(shares), 3), config[3])
        prefill = config[2] == "prefill"
        tried = {k[5]: rows for k, rows in by.items() if k[:5] == (*config, "mps") and k[5] != DEFAULT_SPLIT}
        best = max(tried, key=lambda split: statistics.fmean(r["tokens_per_second"] for r in tried[split].values()))
        rows = tried[best]
        if min(r["tokens_per_second"] for r in rows.values()) > max(r["tokens_per_second"] for r in default.values()):
            gain = (statistics.fmean(r["tokens_per_second"] for r in rows.values())
                    - statistics.fmean(r["tokens_per_second"] for r in default.values())) / alone_tps
            out.append(SplitResult(*regime, best, round(gain, 4),
                                   round(_worst(rows, "itl_p50_s") / _worst(default, "itl_p50_s"), 3),
                                   round(_worst(rows, "itl_p99_s") / _worst(default, "itl_p99_s"), 3), prefill))
        else:
            out.append(SplitResult(*regime, None, 0.0, None, None, prefill))
    return tuple(out)


def measured_best(config: dict) -> tuple[str, bool]:
    """The mode with the highest measured gain (none when both lose), and whether TS and MPS tie."""
    mps, ts = config["measured"], config["measured_ts"]
    if max(mps, ts) < 0:
        return NONE, False
    return (MPS if mps >= ts else TIME_SLICED), abs(mps - ts) < TIE


def proof(configs: list[dict], model: GainModel, ts_model: GainModel, prices: tuple[LatencyPrice, ...] = (),
          splits: tuple[SplitResult, ...] = ()) -> list[dict]:
    """Each configuration through the advisor with one engine alone (mean of the repeats' estimates;
    the chosen mode is the one the mean estimates make best)."""
    rows = []
    for c in configs:
        row = {k: c[k] for k in ("card", "origin", "size", "context", "workload", "cpu_work_ms", "measured", "measured_ts")}
        row["set"] = "held out" if held_out(c) else "training"
        row["spread"] = {m: max(g) - min(g) for m, g in c["gains"].items()}
        mean, row["split_offered"] = _mean_estimates(c, c["alone"], model, ts_model)
        row["estimate_mps"], row["estimate_ts"] = mean.get(MPS), mean.get(TIME_SLICED)
        row["estimate_alone"] = row["estimate_mps"]
        row["chosen"] = chosen = _best_of(mean)
        row["best"], row["tie"] = measured_best(c)
        row["right"] = _right(chosen, row["best"], row["tie"])
        measured_of = {MPS: c["measured"], TIME_SLICED: c["measured_ts"], NONE: 0.0}
        row["error_chosen"] = None if chosen is None else mean[chosen] - measured_of[chosen]
        # the view with two engines under MPS: what MPSTimeSlicingBetter sees, time-slicing only by more
        # than its margin
        under_mps = _mean_estimates(c, c["mps"], model, ts_model)[0]
        row["chosen_under_mps"] = _best_of(under_mps)
        if row["chosen_under_mps"] == TIME_SLICED and under_mps[TIME_SLICED] - under_mps[MPS] <= advisor.SWITCH_MARGIN:
            row["chosen_under_mps"] = MPS
        row["right_under_mps"] = _right(row["chosen_under_mps"], row["best"], row["tie"])
        rows.append(row)
    return rows


def _mean_estimates(config: dict, views: list[dict | None], model: GainModel,
                    ts_model: GainModel) -> tuple[dict[str, float], str | None]:
    """Each mode's estimate through the advisor, the mean over the views (one per repeat), and the
    measured thread split a view made the best mode, if any did."""
    estimates: dict[str, list[float]] = {}
    split_offered = None
    for signals in views:
        seen = engines_seen(config, signals)
        if seen is None:
            continue
        advice = advise(*seen, model=model, ts_model=ts_model)
        if advice.best_mode == MPS_THREAD_SPLIT:
            split_offered = advice.options[0].split
        for option in advice.options:
            estimates.setdefault(option.mode, []).append(option.gain)
    return {mode: statistics.fmean(v) for mode, v in estimates.items()}, split_offered


def _best_of(mean: dict[str, float]) -> str | None:
    """The mode the mean estimates make best, the split scored as MPS (its estimate is MPS's plus a measured step)."""
    return max((m for m in (NONE, TIME_SLICED, MPS) if m in mean), key=lambda m: mean[m], default=None)


def _right(chosen: str | None, best: str, tie: bool) -> bool:
    return chosen == best or (tie and chosen in (MPS, TIME_SLICED))


def held_out_errors(rows: list[dict]) -> dict[str, float]:
    """The largest absolute held-out error of each mode's estimate, in points, rounded up to 0.1."""
    held = [r for r in rows if r["set"] == "held out"]
    return {mode: math.ceil(max(abs(r[f"estimate_{key}"] - r[measured]) for r in held) * 1000) / 10
            for mode, key, measured in ((MPS, "mps", "measured"), (TIME_SLICED, "ts", "measured_ts"))}


def held_out_score(rows: list[dict]) -> str:
    held = [r for r in rows if r["set"] == "held out" and r["error_chosen"] is not None]
    errors = sorted(abs(r["error_chosen"]) * 100 for r in held)
    return (f"{len(held)} configurations; absolute error of the chosen mode's estimate: median "
            f"{statistics.median(errors):.1f} pp, largest {errors[-1]:.1f} pp; {sum(e <= 10 for e in errors)} of "
            f"{len(held)} within 10 pp; the right mode in {sum(r['right'] for r in held)} of {len(held)}")


def without_prefill_term(configs: list[dict], model: GainModel, ts_model: GainModel) -> str:
    """The held-out score of round three's form (no prefill term) fitted on the same training rows,
    which round four declared it would report beside the fit's (docs/mps-gain.md); nothing where the
    fit has no such term."""
    if not (model.idle_per_prefill or ts_model.idle_per_prefill):
        return ""
    rows = proof(configs, *fit(configs, prefill_term=False))
    tested = [(w, wo) for w, wo in zip(proof(configs, model, ts_model), rows) if _key(w) == PREFILL_TEST]
    return (f"\nRound three's form (no prefill term in the idle share) fitted on the same training rows, held out: "
            f"{held_out_score(rows)}. The prefill term's test, 1.5B prefill-heavy at 1024 with 2 ms (error of the "
            "chosen mode, with the term / without): "
            + ("; ".join(f"{w['card']} {_pp(w['error_chosen'])} / {_pp(wo['error_chosen'])} pp" for w, wo in tested)
               or "not measured") + ".\n")


def _key(row: dict) -> tuple:
    return row["size"], row["context"], row["workload"], row["cpu_work_ms"]


def _pp(error: float | None) -> str:
    return "–" if error is None else f"{error * 100:+.1f}"


def table(rows: list[dict], model: GainModel, ts_model: GainModel, splits: tuple[SplitResult, ...]) -> str:
    """The proof: every configuration's estimates against its measured gains, the chosen mode against
    the measured best, and the held-out summary beside what a constant would have scored."""
    def pct(x):
        return "–" if x is None else f"{x * 100:+.0f}%"

    names = {MPS: "MPS", TIME_SLICED: "time-sliced", NONE: "none", None: "–"}
    lines = [f"Models fitted on the training rows: `{model}`, `{ts_model}`.", "",
             "| set | card | source | model | context | workload | CPU ms/step | measured MPS | measured TS | estimate MPS "
             "| estimate TS | chosen | measured best | right | error of chosen, pp | chosen from the view under MPS |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---|"]
    offered = [r for r in rows if r["split_offered"]]
    for r in sorted(rows, key=lambda r: (r["set"] != "held out", r["card"], r["cpu_work_ms"], float(r["size"][:-1]),
                                         r["workload"], r["context"], r["origin"])):
        best = names[r["best"]] + (" (tie)" if r["tie"] else "")
        split = f" + {r['split_offered']} split" if r["split_offered"] and r["chosen"] == MPS else ""
        lines.append(f"| {r['set']} | {r['card']} | {r['origin']} | {r['size']} | {r['context']} | {r['workload']} | {r['cpu_work_ms']:g} | "
                     f"{pct(r['measured'])} | {pct(r['measured_ts'])} | {pct(r['estimate_mps'])} | {pct(r['estimate_ts'])} | "
                     f"{names[r['chosen']]}{split} | {best} | {'yes' if r['right'] else '**no**'} | {_pp(r['error_chosen'])} | "
                     f"{names[r['chosen_under_mps']]} |")
    held = [r for r in rows if r["set"] == "held out" and r["error_chosen"] is not None]
    trained = [max(r["measured"], r["measured_ts"]) for r in rows if r["set"] == "training"]
    constant = statistics.fmean(trained)
    constant_errors = sorted(abs(constant - max(r["measured"], r["measured_ts"])) * 100 for r in held)
    lines += ["", f"Held out: {held_out_score(rows)}. A constant estimate of the best gain (the training mean, "
              f"{constant:+.1%}) would score median {statistics.median(constant_errors):.1f} pp, largest "
              f"{constant_errors[-1]:.1f} pp. From the view with two engines under MPS the right mode is chosen in "
              f"{sum(r['right_under_mps'] for r in held)}"
              f" of {len(held)}.",
              "", f"MPS with a measured thread split is the advisor's best mode in {len(offered)} rows "
              f"({sum(r['set'] == 'held out' for r in offered)} held out), marked \"+ split\"; splits were measured only "
              "in the regimes " + "; ".join(
                  f"{s.params_billion:g}B at {s.context}, busy {s.busy_alone:g} alone: "
                  + (f"{s.split}, {s.gain_over_default * 100:+.1f} points" if s.split else "none beat 100/100")
                  for s in splits) + ", so its rows are scored as MPS, the split's estimate being the MPS estimate "
              "plus the measured difference."]
    return "\n".join(lines) + "\n"


def shipped(configs: list[dict], sweeps: tuple[dict, ...]) -> dict:
    """What advisor.py ships, as this fit gives it."""
    model, ts_model = fit(configs)
    prices, splits = latency_prices(sweeps), measured_splits(sweeps)
    return {"MODEL": model, "TIME_SLICED_MODEL": ts_model, "LATENCY_PRICES": prices, "SPLITS": splits,
            "HELD_OUT_ERROR_PP": held_out_errors(proof(configs, model, ts_model))}


ADVISOR = ROOT / "agent" / "mpswatch" / "advisor.py"
ADVISOR_START, ADVISOR_END = "# mps-gain-fit:start", "# mps-gain-fit:end"
WIDTH = 130  # ruff's line length (pyproject.toml)


def _call(prefix: str, name: str, args: list[str], suffix: str = "") -> list[str]:
    """`prefix + name(args) + suffix`, wrapped at WIDTH with continuation lines under the first argument."""
    lines, line = [], f"{prefix}{name}("
    indent = " " * len(line)
    for index, arg in enumerate(args):
        arg += ", " if index < len(args) - 1 else f"){suffix}"
        if len(line) + len(arg.rstrip()) > WIDTH and line != f"{prefix}{name}(":
            lines.append(line.rstrip())
            line = indent
        line += arg
    return lines + [line.rstrip()] if args else [f"{prefix}{name}(){suffix}"]


def _literal(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)  # the project's quotes


def _keywords(value) -> list[str]:
    """A dataclass's fields as keywords, those at their default left out."""
    return [f"{f.name}={_literal(getattr(value, f.name))}" for f in fields(value)
            if f.default is MISSING or getattr(value, f.name) != f.default]


def _positional(value) -> list[str]:
    """A dataclass's fields in order, trailing ones at their default left out."""
    values = [getattr(value, f.name) for f in fields(value)]
    while values and fields(value)[len(values) - 1].default == values[-1]:
        values.pop()
    return [_literal(v) for v in values]


def advisor_block(fitted: dict) -> str:
    """The constants advisor.py ships, as Python between its markers."""
    model, ts_model, errors = fitted["MODEL"], fitted["TIME_SLICED_MODEL"], fitted["HELD_OUT_ERROR_PP"]
    lines = [f"{ADVISOR_START} (python3 -m benchmarks.mps_gain.fit --write-advisor writes this block; do not edit)",
             "# fitted on the training configurations of the H200 run and the H100 sweeps (docs/mps-gain.md;",
             "# tests/test_advisor.py checks that this block is the fit's)"
             + ("" if model.idle_per_prefill or ts_model.idle_per_prefill else
                "; idle_per_prefill is left out (0):\n# no CPU-held prefill-heavy row is trained on"),
             *_call("MODEL = ", "GainModel", _keywords(model)),
             *_call("TIME_SLICED_MODEL = ", "GainModel", _keywords(ts_model)),
             "# measured in the sweeps, derived from their rows: params, prompt length, prefill-heavy, busy share",
             "# alone, CPU ms a step, ITL p50 and p99 over alone's time-sliced, then under MPS, and where it",
             "# prefills TTFT p50 and p99 over alone's likewise",
             "LATENCY_PRICES: tuple[LatencyPrice, ...] = (",
             *(line for price in fitted["LATENCY_PRICES"] for line in _call("    ", "LatencyPrice", _positional(price), ",")),
             ")",
             "# params, prompt length, busy share alone, CPU ms a step, the split that beat 100/100, by how much,",
             "# its ITL p50 and p99 ratios, and whether prefill-heavy (left out: decode-heavy)",
             "SPLITS: tuple[SplitResult, ...] = (",
             *(line for split in fitted["SPLITS"] for line in _call("    ", "SplitResult", _positional(split), ",")),
             ")",
             "# the largest absolute error of each mode's estimate over the held-out rows, in points",
             f"HELD_OUT_ERROR_PP: dict[str, float] = {{{', '.join(f'{_literal(k)}: {v!r}' for k, v in errors.items())}}}",
             ADVISOR_END]
    return "\n".join(lines) + "\n"


def write_advisor(path: Path, fitted: dict) -> None:
    text = path.read_text()
    if text.count(ADVISOR_START) != 1 or text.count(ADVISOR_END) != 1:
        raise SystemExit(f"{path} needs one {ADVISOR_START!r} and one {ADVISOR_END!r} line around the fitted constants")
    before, rest = text.split(ADVISOR_START, 1)
    _, after = rest.split(ADVISOR_END, 1)
    path.write_text(before + advisor_block(fitted) + after.removeprefix("\n"))


def sweep_name(path: str) -> str:
    """A sweep file's name without its date, card and suffix: sweep, sweep-r3-decode, ..."""
    return Path(path).name.removesuffix(".gz").removesuffix(".json").split("mps-gain-")[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS), help="the H200 run (report.py --merged)")
    parser.add_argument("--sweeps", nargs="+", default=[str(path) for path in SWEEPS],
                        help="issue 21's sweeps (sweep.py --out)")
    parser.add_argument("--write-doc", action="store_true", help=f"write the proof table into {DOC.relative_to(ROOT)}")
    parser.add_argument("--write-advisor", action="store_true",
                        help=f"write the fitted constants into {ADVISOR.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the advisor ships exactly this fit")
    args = parser.parse_args(argv)
    if args.write_advisor and (args.write_doc or args.check):
        parser.error("--write-advisor alone: the doc's proof and --check score what the advisor ships, so they come "
                     "after it, in a new process")
    sweeps = tuple(load_results(path) for path in args.sweeps)
    configs = configurations(load_results(args.results), sweeps, tuple(sweep_name(path) for path in args.sweeps))
    fitted = shipped(configs, sweeps)
    model, ts_model = fitted["MODEL"], fitted["TIME_SLICED_MODEL"]
    text = (table(proof(configs, model, ts_model), model, ts_model, fitted["SPLITS"])
            + without_prefill_term(configs, model, ts_model))
    print(text)
    for name, value in fitted.items():
        print(f"{name} = {value!r}")
    if args.write_doc:
        doc = DOC.read_text()
        before, rest = doc.split(START, 1)
        _, after = rest.split(END, 1)
        DOC.write_text(f"{before}{START}\n{text}{END}{after}")
    if args.write_advisor:
        write_advisor(ADVISOR, fitted)
        print(f"wrote {ADVISOR.relative_to(ROOT)}; now --write-doc --check (a new process scores what it ships)",
              file=sys.stderr)
        return 0
    wrong = [name for name, value in fitted.items() if getattr(advisor, name) != value]
    if args.check and wrong:
        print(f"the advisor's {', '.join(wrong)} differ from this fit's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
