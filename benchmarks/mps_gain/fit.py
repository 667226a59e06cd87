"""Fits the advisor's gain model (agent/mpswatch/advisor.py) on part of the H200 measurements and
holds its estimates against the measured gains of the rest, through the advisor's own code.

    python3 -m benchmarks.mps_gain.fit [RESULTS.json[.gz]] [--write-doc] [--check]

The held-out configurations are every 1.5B one, every other one at context 512, and the CPU-bound
one at 3 ms a step: a model size, a context and a CPU load the fit never sees. The advisor is given what
the agent saw while one engine ran alone (its busiest thread, from the case's recorded signals),
the model's name, the prompt length and the prefill share as the engine's vLLM metrics state them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from mpswatch.advisor import MODEL, GainModel, advise, busy_alone, verdict_of
from mpswatch.engine_kinds import parameters_from_model_name
from mpswatch.snapshot import EngineState, GpuState

ROOT = Path(__file__).resolve().parents[2]

RESULTS = ROOT / "benchmarks" / "mps_gain" / "mps-gain.json.gz"  # the H200 run docs/mps-gain.md reports
DOC = ROOT / "docs" / "mps-gain.md"
START, END = "<!-- mps-gain-proof:start -->", "<!-- mps-gain-proof:end -->"
PREFILL_GENERATED = 16  # tokens generated per prompt in the prefill-heavy workload (cases.py)


def load_results(path: str | Path) -> dict:
    """Merged results (benchmarks/mps_gain/report.py --merged), gzipped when the name ends in .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def held_out(config: dict) -> bool:
    if config["cpu_work_ms"]:
        return config["cpu_work_ms"] == 3
    return config["size"] == "1.5B" or config["context"] == 512


def configurations(results: dict) -> list[dict]:
    """One entry per (size, context, workload, CPU work) with its measured gain and what the agent saw."""
    by_key: dict[tuple, dict] = {}
    for case in results["cases"]:
        key = (case["size"], case["context"], case["workload"], case["cpu_work_ms"])
        by_key.setdefault(key, {})[case["mode"]] = case
    out = []
    for (size, context, workload, cpu_ms), modes in sorted(by_key.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2], kv[0][1])):
        if "alone" not in modes or "mps" not in modes:
            continue
        out.append({
            "size": size, "context": context, "workload": workload, "cpu_work_ms": cpu_ms,
            "measured": modes["mps"]["tokens_per_second"] / modes["alone"]["tokens_per_second"] - 1,
            "alone": modes["alone"].get("signals"), "mps": modes["mps"].get("signals"),
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


def features(config: dict) -> tuple[float, float, float, float]:
    gpu, engines = engines_seen(config, config["alone"])
    params = max(e.model_parameters for e in engines) / 1e9
    return 1.0, math.log2(params), math.log2(config["context"] / 128), prefill_share(config)


def busy(config: dict) -> float:
    """Share of time the GPU was busy with the engine alone (NVML's coarse utilisation)."""
    gpu, engines = engines_seen(config, config["alone"])
    return busy_alone(gpu.utilization_ratio, len(engines))


def least_squares(rows: list[tuple[float, ...]], targets: list[float]) -> list[float]:
    """Normal equations solved by Gauss-Jordan elimination: four unknowns, no numpy needed."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * t for r, t in zip(rows, targets))]
         for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit(configs: list[dict]) -> GainModel:
    train = [c for c in configs if not held_out(c) and c["alone"]]
    gpu_bound = [c for c in train if c["cpu_work_ms"] == 0]
    coefficients = least_squares([features(c) for c in gpu_bound], [c["measured"] for c in gpu_bound])
    cpu_bound = [c for c in train if c["cpu_work_ms"] > 0]
    if not cpu_bound:
        raise SystemExit("no CPU-bound configuration to fit the idle-time overlap on")
    overlap = [c["measured"] / min(1.0, (1 - busy(c)) / busy(c)) for c in cpu_bound]
    return GainModel(*(round(x, 4) for x in coefficients), idle_overlap=round(sum(overlap) / len(overlap), 4))


def proof(configs: list[dict], model: GainModel) -> list[dict]:
    rows = []
    for c in configs:
        row = {k: c[k] for k in ("size", "context", "workload", "cpu_work_ms", "measured")}
        row["set"] = "held out" if held_out(c) else "training"
        for mode in ("alone", "mps"):
            seen = engines_seen(c, c[mode])
            advice = advise(*seen, model=model) if seen else None
            row[f"estimate_{mode}"] = advice.gain_estimate if advice else None
            row[f"verdict_{mode}"] = advice.verdict if advice else None
        rows.append(row)
    return rows


def table(rows: list[dict], model: GainModel) -> str:
    """The proof: every configuration's estimate against its measured gain, and the held-out summary
    beside what a constant (the training rows' mean gain) would have scored."""
    def pct(x):
        return "–" if x is None else f"{x * 100:+.0f}%"

    def pp(est, measured):
        return "–" if est is None else f"{(est - measured) * 100:+.1f}"

    lines = [f"Model fitted on the training rows: `{model}`.", "",
             "| set | model | context | workload | CPU ms/step | measured MPS gain | estimate (agent's view, one engine alone) | error, pp | verdict | estimate (view under MPS) | error, pp |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["set"] != "held out", r["cpu_work_ms"], float(r["size"][:-1]), r["workload"], r["context"])):
        lines.append(f"| {r['set']} | {r['size']} | {r['context']} | {r['workload']} | {r['cpu_work_ms']:g} | {pct(r['measured'])} | "
                     f"{pct(r['estimate_alone'])} | {pp(r['estimate_alone'], r['measured'])} | {r['verdict_alone'] or '–'} | "
                     f"{pct(r['estimate_mps'])} | {pp(r['estimate_mps'], r['measured'])} |")
    held = [r for r in rows if r["set"] == "held out" and r["estimate_alone"] is not None]
    errors = sorted(abs(r["estimate_alone"] - r["measured"]) * 100 for r in held)
    within = sum(e <= 10 for e in errors)
    agree = sum(r["verdict_alone"] == verdict_of(r["measured"]) for r in held)
    trained = [r["measured"] for r in rows if r["set"] == "training"]
    constant = sum(trained) / len(trained)
    constant_errors = sorted(abs(constant - r["measured"]) * 100 for r in held)
    lines += ["", f"Held out: {len(held)} configurations; absolute error (agent's view with one engine alone) median "
              f"{errors[len(errors) // 2]:.1f} pp, largest {errors[-1]:.2f} pp; {within} of {len(held)} within 10 pp; "
              f"the verdict is the one the measured gain gives in {agree} of {len(held)}. "
              f"A constant estimate (the training mean, {constant:+.1%}) would score median "
              f"{constant_errors[len(constant_errors) // 2]:.1f} pp, largest {constant_errors[-1]:.1f} pp."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(RESULTS))
    parser.add_argument("--write-doc", action="store_true", help=f"write the proof table into {DOC.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the advisor ships exactly this fit")
    args = parser.parse_args(argv)
    configs = configurations(load_results(args.results))
    model = fit(configs)
    text = table(proof(configs, model), model)
    print(text)
    if args.write_doc:
        doc = DOC.read_text()
        before, rest = doc.split(START, 1)
        _, after = rest.split(END, 1)
        DOC.write_text(f"{before}{START}\n{text}{END}{after}")
    if args.check and replace(model) != MODEL:
        print(f"the advisor ships {MODEL}, the fit gives {model}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
