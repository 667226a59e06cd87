"""Merges result files of benchmarks/mps_gain/run.py and writes their table into docs/mps-gain.md,
between `<!-- mps-gain-table:start -->` and `<!-- mps-gain-table:end -->`.

    python3 -m benchmarks.mps_gain.report a.json b.json [--merged ALL.json[.gz]] [--doc docs/mps-gain.md]

A row per (size, context, workload, CPU work): tokens/s of one engine alone, the gain of two engines
time-sliced and under MPS (two-engine total / alone - 1), and what the agent saw of the GPU (GPM SM
active, DRAM bandwidth) alone and under MPS, and of the engine's busiest thread alone.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from benchmarks.mps_gain.cases import SHAPES

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- mps-gain-table:start -->", "<!-- mps-gain-table:end -->"
MODE_ORDER = {"alone": 0, "timesliced": 1, "mps": 2}
WORKLOAD_ORDER = {"decode": 0, "prefill": 1}


def load_results(path: str | Path) -> dict:
    """A results file (run.py's, this module's --merged, or sweep.py --out), gzipped when the name ends in .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def row_of(case: dict) -> tuple[str, int, str, float]:
    """The table row a case belongs to: its modes side by side."""
    return case["size"], case["context"], case["workload"], case["cpu_work_ms"]


def row_order(row: tuple[str, int, str, float]) -> tuple:
    """By model size, then CPU work, workload and context."""
    size, context, workload, cpu_work_ms = row
    return SHAPES[size].params, cpu_work_ms, WORKLOAD_ORDER[workload], context


def merge(results: list[dict]) -> dict:
    """One result of the same shape; a case measured in several files is taken from the last."""
    cases = {}
    for result in results:
        for case in result["cases"]:
            cases[(*row_of(case), case["mode"])] = case
    return {
        "gpu": results[0]["gpu"],
        "driver": results[0]["driver"],
        "date": ", ".join(dict.fromkeys(result["date"] for result in results)),
        "seconds": min(result["seconds"] for result in results),  # the shortest window any case had
        "cases": sorted(cases.values(), key=lambda case: (*row_order(row_of(case)), MODE_ORDER[case["mode"]])),
    }


def gpu_signal(case: dict | None, name: str) -> float | None:
    """A GPU figure the agent saw during the case, on the GPU its engines ran on."""
    signals = (case or {}).get("signals")
    if not signals or not signals["gpus"]:
        return None
    used = {engine["gpu_uuid"] for engine in signals["engines"] if engine.get("gpu_uuid")}
    gpu = next((gpu for gpu in signals["gpus"] if gpu["uuid"] in used), signals["gpus"][0])
    return gpu.get(name)


def busiest_thread(case: dict | None) -> str:
    signals = (case or {}).get("signals")
    ratios = [engine["mps_engine_busiest_thread_cpu_ratio"] for engine in (signals or {}).get("engines", ())
              if engine.get("mps_engine_busiest_thread_cpu_ratio") is not None]
    if not ratios:
        return "–"
    cpu_bound = any(engine.get("mps_engine_cpu_bound") == 1 for engine in signals["engines"])
    return f"{max(ratios):.2f}" + (" CPU-bound" if cpu_bound else "")


def gain(alone: dict | None, shared: dict | None) -> str:
    if not alone or not shared or alone["tokens_per_second"] <= 0:
        return "–"
    return f"{(shared['tokens_per_second'] / alone['tokens_per_second'] - 1) * 100:+.0f}%"


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_table(results: dict) -> str:
    rows: dict[tuple, dict[str, dict]] = {}
    for case in results["cases"]:
        rows.setdefault(row_of(case), {})[case["mode"]] = case
    lines = [
        f"{results['gpu']}, driver {results['driver']}, run {results['date']}; "
        f"{results['seconds']:g} s measured per case.",
        "",
        "| model | context | workload | CPU ms/step | alone tok/s | time-sliced | MPS "
        "| SM active alone → MPS | DRAM bw alone → MPS | busiest thread alone |",
        "|---|---:|---|---:|---:|---:|---:|---|---|---|",
    ]
    for (size, context, workload, cpu_work_ms), modes in sorted(rows.items(), key=lambda row: row_order(row[0])):
        alone, mps = modes.get("alone"), modes.get("mps")
        alone_tps = f"{alone['tokens_per_second']:,.0f}" if alone else "–"
        sm = f"{ratio(gpu_signal(alone, 'mps_gpu_sm_active_ratio'))} → {ratio(gpu_signal(mps, 'mps_gpu_sm_active_ratio'))}"
        dram = (f"{ratio(gpu_signal(alone, 'mps_gpu_dram_bandwidth_ratio'))} → "
                f"{ratio(gpu_signal(mps, 'mps_gpu_dram_bandwidth_ratio'))}")
        lines.append(f"| {size} | {context} | {workload} | {cpu_work_ms:g} | {alone_tps} | "
                     f"{gain(alone, modes.get('timesliced'))} | {gain(alone, mps)} | {sm} | {dram} | {busiest_thread(alone)} |")
    return "\n".join(lines)


def write_table(doc: Path, table: str) -> None:
    text = doc.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc}: no {START} ... {END} markers")
    doc.write_text(text[: start + len(START)] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge benchmarks/mps_gain results and write their table.")
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "mps-gain.md")
    parser.add_argument("--merged", type=Path, help="also write the merged results here (gzipped if it ends in .gz)")
    args = parser.parse_args(argv)
    merged = merge([load_results(path) for path in args.results])
    table = render_table(merged)
    write_table(args.doc, table)
    if args.merged:
        text = json.dumps(merged, indent=2) + "\n"
        if args.merged.suffix == ".gz":
            args.merged.write_bytes(gzip.compress(text.encode(), mtime=0))
        else:
            args.merged.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
