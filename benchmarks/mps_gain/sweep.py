"""Issue 21's sweep: the CPU-held range in small steps, in the three modes, with latency and the
agent's signals, and MPS thread shares; one GPU call, then a report anywhere.

    python3 -m benchmarks.mps_gain.sweep --out sweep.json --logs logs     # on the GPU, 9 min at most
    python3 -m benchmarks.mps_gain.sweep --report sweep.json[.gz] [more.json ...]  # the markdown tables
    python3 -m benchmarks.mps_gain.sweep --device cpu --quick --out /tmp/s.json   # a smoke test, no GPU

1. CPU work per step (the engine's --cpu-work-ms: 0, 0.5, 1, 1.5, 2, 3, 4 ms by default, up to past
   the GPU's step time) for each configuration (SIZE@CONTEXT[:WORKLOAD], decode unless said, with
   =MS+MS... for levels of its own; by default issue 21's two counter-examples, 0.5B decode at
   context 512 and 1.5B decode at context 1024), each alone, time-sliced and under MPS. A launch (one
   model build) runs every level twice, the second time in reverse order, so that the spread between
   repeats is stated and drift over a launch does not fall on one end of the range. Windows are short
   (2 s measured after 0.5 s). The prefill workload gives each engine's time to first token as well as
   its inter-token latency.
2. MPS thread shares: for each share configuration (--share-configs, 0.5B decode at 512 by default),
   two engines with the --share-cpu-work-ms levels (1.5 and 0 ms, or its own) under MPS with
   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE 70/30 and 50/50 in their environments (MPS takes a client's
   value at context creation when it is at most the server's); 100/100 is that configuration's own
   MPS launch in part 1, which must measure the same levels. Engine 0 is the latency-sensitive one
   (the larger share).

A row per case and repeat: size, context, workload, CPU work, mode, repeat, split, per-engine tokens/s
and the total, the engines' own exact inter-token latency (and time to first token where a workload
has prefills) p50/p99/mean from their step times (engine 0's also at the top level), and the agent's
signals as run.py stores them (GPU utilisation and SM activity, busiest thread, ...). Gains against
alone are the report's. The estimate printed first uses run.py's guesses (a launch's start and a
case's overhead) and is recalibrated from each launch's measured time; a group of launches whose
calibrated estimate would end past --budget-s is skipped. Results are written after every launch.
"""

from __future__ import annotations

import argparse
import datetime
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from benchmarks.mps_gain import run
from benchmarks.mps_gain.cases import SHAPES, WORKLOADS, Case
from benchmarks.mps_gain.report import gpu_signal, load_results
from benchmarks.mps_gain.run import Launch, estimate_seconds, keep_logs, log, run_engines, write_results


@dataclass(frozen=True, order=True)
class Config:
    """A model at a prompt length with a workload: what the CPU levels and modes are measured for; its
    own CPU levels where it names them (a call's configurations need not share theirs), else the
    sweep's. The levels are not part of its identity: the report meets it again in result rows."""

    size: str
    context: int
    workload: str = "decode"
    cpu_work_ms: tuple[float, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return f"{self.size}@{self.context}" + ("" if self.workload == "decode" else f":{self.workload}")

    @classmethod
    def parse(cls, spec: str) -> Config:
        """`SIZE@CONTEXT[:WORKLOAD][=MS+MS...]`."""
        form = "not SIZE@CONTEXT[:WORKLOAD][=MS+MS...] with a known size and workload and CPU levels of 0 ms or more"
        named, _, levels = spec.partition("=")
        size, _, rest = named.partition("@")
        context, _, workload = rest.partition(":")
        try:
            config = cls(size, int(context), workload or "decode",
                         tuple(float(ms) for ms in levels.split("+")) if levels else ())
        except ValueError:
            raise ValueError(f"{form}: {spec!r}") from None
        if (config.size not in SHAPES or config.workload not in WORKLOADS or config.context < 1
                or any(not (math.isfinite(ms) and ms >= 0) for ms in config.cpu_work_ms) or ("=" in spec and not config.cpu_work_ms)):
            raise ValueError(f"{form}: {spec!r}")
        return config

    def levels(self, default: list[float]) -> list[float]:
        return list(self.cpu_work_ms) or default


CONFIGS = (Config("0.5B", 512), Config("1.5B", 1024))
CPU_WORK_MS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
SPLITS = ((70, 30), (50, 50))
SHARE_CONFIGS = (Config("0.5B", 512),)
SHARE_CPU_WORK_MS = (1.5, 0.0)
LATENCY_KEYS = ("itl_p50_s", "itl_p99_s", "itl_mean_s", "ttft_p50_s", "ttft_p99_s")
DEFAULT_SPLIT = "100/100"


@dataclass(frozen=True)
class SweepLaunch:
    group: str  # launches the budget keeps or skips together
    launch: Launch
    repeats: tuple[int, ...]  # the repeat of each case
    split: tuple[int, int] | None = None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of engine 0 and 1; None: unset
    needs: str | None = None  # the group whose default MPS rows a split is compared with: skipped with it

    @property
    def split_text(self) -> str:
        return DEFAULT_SPLIT if self.split is None else f"{self.split[0]}/{self.split[1]}"

    def engine_env(self) -> list[dict[str, str]] | None:
        if self.split is None:
            return None
        return [{"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share)} for share in self.split]


def repeated(cases: list[Case], repeats: int) -> tuple[tuple[Case, ...], tuple[int, ...]]:
    """The cases `repeats` times, every other time in reverse order; and each one's repeat."""
    out: list[Case] = []
    which: list[int] = []
    for repeat in range(repeats):
        out += cases if repeat % 2 == 0 else cases[::-1]
        which += [repeat] * len(cases)
    return tuple(out), tuple(which)


def plan(configs: list[Config], cpu_work_ms: list[float], modes: list[str], repeats: int,
         splits: list[tuple[int, int]], share_configs: list[Config], share_cpu_work_ms: list[float]) -> list[SweepLaunch]:
    """Each configuration in every mode (a group), at its own CPU levels or `cpu_work_ms`, then each
    share configuration's thread splits under MPS (a group each)."""
    launches = []
    for config in configs:
        cases, which = repeated([Case(config.context, config.workload, ms) for ms in config.levels(cpu_work_ms)], repeats)
        launches += [SweepLaunch(config.name, Launch(config.name.replace(":", "-"), config.size, mode, cases), which)
                     for mode in modes]
    if "mps" in modes:
        for config in share_configs:
            for split in splits:
                cases, which = repeated([Case(config.context, config.workload, ms) for ms in config.levels(share_cpu_work_ms)],
                                        repeats)
                group = f"shares-{config.name.replace(':', '-')}-{split[0]}-{split[1]}"
                launches.append(SweepLaunch(group, Launch(group, config.size, "mps", cases), which, split, config.name))
    return launches


def shares_unmeasured(configs: list[Config], cpu_work_ms: list[float], share_configs: list[Config],
                      share_cpu_work_ms: list[float]) -> list[str]:
    """Share configurations whose default (100/100) MPS rows this sweep would not measure at their levels:
    a split has nothing in the same run to be compared with."""
    levels = {config: set(config.levels(cpu_work_ms)) for config in configs}
    return [config.name for config in share_configs
            if not set(config.levels(share_cpu_work_ms)) <= levels.get(config, set())]


def rows(sweep: SweepLaunch, lines: list[list[dict]], signals: dict[int, dict | None]) -> list[dict]:
    """One row per case every engine reported."""
    launch = sweep.launch
    out = []
    for index, case in enumerate(launch.cases):
        reported = [next((line for line in engine_lines if line["case"] == index), None) for engine_lines in lines]
        if not reported or None in reported:
            continue
        per_engine = [line["tokens"] / line["seconds"] for line in reported]
        latency = [{key: line.get(key) for key in LATENCY_KEYS} for line in reported]
        out.append({
            "size": launch.size, "params_billion": SHAPES[launch.size].params_billion, "context": case.context,
            "workload": case.workload, "cpu_work_ms": case.cpu_work_ms, "mode": launch.mode,
            "repeat": sweep.repeats[index], "split": sweep.split_text,
            "tokens_per_second": sum(per_engine), "per_engine_tokens_per_second": per_engine,
            **latency[0], "per_engine_latency": latency, "signals": signals.get(index),
        })
    return out


def skip_reason(needs: str | None, skipped: list[str], elapsed: float, need: float, budget: float) -> str | None:
    """Why a group is not run: its time would end past the budget (0: none), or it is a split whose
    configuration's default MPS rows were skipped; None: run it."""
    if needs in skipped:
        return f"{needs}, whose default MPS rows it is compared with, was skipped"
    if budget and elapsed + need > budget:
        return f"about {need:.0f} s from {elapsed:.0f} s would end past the {budget:g} s budget"
    return None


def calibrated(estimated: float, done_estimated: float, done_measured: float) -> float:
    """An estimate scaled by what the launches so far took against their estimates."""
    return estimated * (done_measured / done_estimated if done_estimated > 0 else 1.0)


# ---------------------------------------------------------------- the report (pure)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.2f}"


def _gains(shared: dict[int, dict], alone: dict[int, dict]) -> list[float]:
    """Per repeat measured in both: shared total / alone - 1."""
    return [shared[r]["tokens_per_second"] / alone[r]["tokens_per_second"] - 1
            for r in sorted(shared) if r in alone and alone[r]["tokens_per_second"] > 0]


def _gain_text(gains: list[float]) -> str:
    if not gains:
        return "–"
    text = f"{statistics.fmean(gains) * 100:+.0f}%"
    return text + (f" ({min(gains) * 100:+.0f} … {max(gains) * 100:+.0f})" if len(gains) > 1 else "")


def _itl(modes: dict[str, dict[int, dict]], key: str) -> str:
    """Engine 0's latency `key` in ms per mode (alone / time-sliced / MPS), mean over repeats."""
    return " / ".join(_ms(_mean([row[key] for row in modes[mode].values() if row.get(key) is not None]))
                      for mode in run.MODES)


def _engine(measured: dict[int, dict], index: int, key: str) -> float | None:
    return _mean([row["per_engine_latency"][index][key] for row in measured.values()
                  if row["per_engine_latency"][index].get(key) is not None])


def _signal(rows: dict[int, dict], key: str) -> str:
    """A GPU signal (or an engine's, the busiest of the engines) as the agent saw it, mean over repeats."""
    values = []
    for row in rows.values():
        if key.startswith("mps_gpu_"):
            value = gpu_signal(row, key)
        else:
            seen = [e[key] for e in ((row.get("signals") or {}).get("engines") or []) if e.get(key) is not None]
            value = max(seen) if seen else None
        if value is not None:
            values.append(value)
    mean = _mean(values)
    return "–" if mean is None else f"{mean:.2f}"


def _config(row: dict) -> Config:
    return Config(row["size"], row["context"], row.get("workload", "decode"))


def render(results: dict) -> str:
    """Markdown: per configuration, gains MPS and time-sliced vs alone with their spread over repeats,
    the agent's view alone; engine 0's ITL (and TTFT where it prefills) p50/p99 per mode; then each
    configuration's thread shares."""
    by: dict[tuple, dict[int, dict]] = {}
    for row in results["rows"]:
        by.setdefault((_config(row), row["cpu_work_ms"], row["mode"], row["split"]), {})[row["repeat"]] = row
    lines = [f"{results['gpu']}, driver {results['driver']}, run {results['date']}; "
             f"{results['seconds']:g} s measured per case after {results['warmup']:g} s; "
             f"gains: mean over repeats (min … max).", ""]
    configs = sorted({_config(row) for row in results["rows"] if row["split"] == DEFAULT_SPLIT},
                     key=lambda config: (config.workload, SHAPES[config.size].params, config.context))
    for config in configs:
        levels = sorted({row["cpu_work_ms"] for row in results["rows"]
                         if (_config(row), row["split"]) == (config, DEFAULT_SPLIT)})
        prefills = config.workload == "prefill"
        lines += [f"**{config.size} {config.workload} at {config.context}**", "",
                  "| CPU ms/step | alone tok/s | time-sliced | MPS | GPU util alone | busiest thread alone "
                  "| ITL p50 alone / TS / MPS ms | ITL p99 alone / TS / MPS ms |"
                  + (" TTFT p50 alone / TS / MPS ms | TTFT p99 alone / TS / MPS ms |" if prefills else ""),
                  "|---:|---:|---:|---:|---:|---:|---|---|" + ("---|---|" if prefills else "")]
        for ms in levels:
            modes = {mode: by.get((config, ms, mode, DEFAULT_SPLIT), {}) for mode in run.MODES}
            alone = modes["alone"]
            alone_tps = _mean([row["tokens_per_second"] for row in alone.values()])
            util = _mean([v for row in alone.values()
                          if (v := gpu_signal(row, "mps_gpu_utilization_ratio")) is not None])
            threads = _mean([engine["mps_engine_busiest_thread_cpu_ratio"] for row in alone.values()
                             for engine in ((row.get("signals") or {}).get("engines") or [])
                             if engine.get("mps_engine_busiest_thread_cpu_ratio") is not None])

            lines.append(f"| {ms:g} | {'–' if alone_tps is None else f'{alone_tps:,.0f}'} | "
                         f"{_gain_text(_gains(modes['timesliced'], alone))} | {_gain_text(_gains(modes['mps'], alone))} | "
                         f"{'–' if util is None else f'{util:.2f}'} | {'–' if threads is None else f'{threads:.2f}'} | "
                         f"{_itl(modes, 'itl_p50_s')} | {_itl(modes, 'itl_p99_s')} |"
                         + (f" {_itl(modes, 'ttft_p50_s')} | {_itl(modes, 'ttft_p99_s')} |" if prefills else ""))
        lines += ["", f"The agent's signals, {config.size} {config.workload} at {config.context} "
                  "(mean over repeats; alone / time-sliced / MPS):", "",
                  "| CPU ms/step | GPU util | SM active | DRAM bandwidth | busiest thread |",
                  "|---:|---|---|---|---|"]
        for ms in levels:
            modes = {mode: by.get((config, ms, mode, DEFAULT_SPLIT), {}) for mode in run.MODES}
            lines.append(f"| {ms:g} | " + " | ".join(
                " / ".join(_signal(modes[mode], key) for mode in run.MODES)
                for key in ("mps_gpu_utilization_ratio", "mps_gpu_sm_active_ratio", "mps_gpu_dram_bandwidth_ratio",
                            "mps_engine_busiest_thread_cpu_ratio")) + " |")
        lines.append("")
    share_configs = sorted({_config(row) for row in results["rows"] if row["split"] != DEFAULT_SPLIT},
                           key=lambda config: (config.workload, SHAPES[config.size].params, config.context))
    for config in share_configs:
        split_levels = {row["cpu_work_ms"] for row in results["rows"]
                        if _config(row) == config and row["split"] != DEFAULT_SPLIT}
        shares = sorted({(row["cpu_work_ms"], row["split"]) for row in results["rows"]
                         if _config(row) == config and row["mode"] == "mps" and row["cpu_work_ms"] in split_levels},
                        key=lambda item: (-item[0], [-int(part) for part in item[1].split("/")]))
        lines += [f"**MPS thread shares, two {config.size} {config.workload} engines at {config.context}** "
                  "(engine 0: the larger share)", "",
                  "| CPU ms/step | split | engine 0 ITL p50 / p99 ms | engine 1 ITL p50 / p99 ms "
                  "| tok/s engine 0 / 1 | total tok/s | gain vs alone |",
                  "|---:|---|---|---|---|---:|---:|"]
        for ms, split in shares:
            measured = by.get((config, ms, "mps", split), {})
            alone = by.get((config, ms, "alone", DEFAULT_SPLIT), {})

            per_engine = [_mean([row["per_engine_tokens_per_second"][i] for row in measured.values()]) for i in (0, 1)]
            total = _mean([row["tokens_per_second"] for row in measured.values()])
            lines.append(f"| {ms:g} | {split} | {_ms(_engine(measured, 0, 'itl_p50_s'))} / "
                         f"{_ms(_engine(measured, 0, 'itl_p99_s'))} | {_ms(_engine(measured, 1, 'itl_p50_s'))} / "
                         f"{_ms(_engine(measured, 1, 'itl_p99_s'))} | "
                         + " / ".join("–" if v is None else f"{v:,.0f}" for v in per_engine)
                         + f" | {'–' if total is None else f'{total:,.0f}'} | {_gain_text(_gains(measured, alone))} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def listed(kind):
        return lambda text: [kind(item) for item in text.split(",") if item]

    def configs(text: str) -> list[Config]:
        try:
            return [Config.parse(item) for item in text.split(",") if item]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    def splits(text: str) -> list[tuple[int, int]]:
        return [(int(item.split("/")[0]), int(item.split("/")[1])) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(description="Issue 21's sweep: CPU work per step x mode, latency, MPS thread shares.",
                                     epilog="GPU: python3 -m benchmarks.mps_gain.sweep --out sweep.json --logs logs; "
                                            "then: python3 -m benchmarks.mps_gain.sweep --report sweep.json")
    parser.add_argument("--out", type=Path, help="the results, JSON, written after every launch")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RESULTS",
                        help="print the markdown tables of results files (one card's, each file's own rows)")
    parser.add_argument("--configs", type=configs, default=list(CONFIGS),
                        help="SIZE@CONTEXT[:WORKLOAD][=MS+MS...],... (0.5B@512,1.5B@1024; workload decode or "
                             "prefill; =MS+MS...: this configuration's CPU levels instead of --cpu-work-ms)")
    parser.add_argument("--cpu-work-ms", type=listed(float), default=list(CPU_WORK_MS))
    parser.add_argument("--modes", type=listed(str), default=list(run.MODES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--splits", type=splits, default=list(SPLITS), help="MPS thread shares E0/E1,... ('' for none)")
    parser.add_argument("--share-configs", type=configs, default=list(SHARE_CONFIGS),
                        help="SIZE@CONTEXT[:WORKLOAD],... whose thread shares are measured (0.5B@512)")
    parser.add_argument("--share-cpu-work-ms", type=listed(float), default=list(SHARE_CPU_WORK_MS))
    parser.add_argument("--seconds", type=float, default=2.0, help="measured window of a case")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--budget-s", type=float, default=530.0, help="skip groups whose calibrated estimate ends past it")
    parser.add_argument("--quick", action="store_true", help="0.5B at 128, CPU work 0 and 1 ms, 1 s windows, no shares")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run (no MPS mode)")
    parser.add_argument("--logs", type=Path, help="keep each launch's engine, agent and MPS logs here")
    args = parser.parse_args(argv)
    if args.report is None and args.out is None:
        parser.error("give --out (to measure) or --report (to print tables)")
    if args.quick:
        args.configs, args.cpu_work_ms, args.splits = [Config("0.5B", 128)], [0.0, 1.0], []
        args.seconds, args.warmup = 1.0, 0.2
    unknown = set(args.modes) - set(run.MODES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    if any(a > 100 or b > 100 or a < 1 or b < 1 for a, b in args.splits):
        parser.error("thread shares are percentages from 1 to 100")
    unmeasured = shares_unmeasured(args.configs, args.cpu_work_ms, args.share_configs, args.share_cpu_work_ms)
    if args.splits and "mps" in args.modes and unmeasured:
        parser.error(f"thread shares of {', '.join(unmeasured)} need that configuration in --configs at the same "
                     "CPU levels: its default MPS rows are what a split is compared with")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report is not None:
        print("\n".join(render(load_results(path)) for path in args.report), end="", flush=True)
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # finally blocks stop MPS
    missing = run.mps_control_missing() or ("--device cpu" if args.device == "cpu" else None)
    if missing and "mps" in args.modes:
        log(f"mps mode and thread shares skipped: {missing}")
        args.modes = [mode for mode in args.modes if mode != "mps"]
    launches = plan(args.configs, args.cpu_work_ms, args.modes, args.repeats, args.splits, args.share_configs,
                    args.share_cpu_work_ms)
    total = estimate_seconds([sweep.launch for sweep in launches], args.seconds, args.warmup)
    log(f"{len(launches)} launches, {sum(len(s.launch.cases) for s in launches)} case runs, estimated "
        f"{total / 60:.1f} min (run.py's guesses; recalibrated after each launch), budget {args.budget_s:g} s")
    gpu, driver = run.gpu_identity()
    results = {"gpu": gpu, "driver": driver, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "seconds": args.seconds, "warmup": args.warmup, "skipped": [], "rows": []}
    write_results(args.out, results)
    done_estimated = done_measured = 0.0
    with tempfile.TemporaryDirectory(prefix="mps-sweep-") as tmp:
        for group, members in groupby(launches, key=lambda sweep: sweep.group):
            members = list(members)
            need = calibrated(estimate_seconds([s.launch for s in members], args.seconds, args.warmup),
                              done_estimated, done_measured)
            elapsed = time.monotonic() - run._started
            why = skip_reason(members[0].needs, results["skipped"], elapsed, need, args.budget_s)
            if why:
                log(f"skipped {group}: {why}")
                results["skipped"].append(group)
                write_results(args.out, results)
                continue
            for sweep in members:
                began = time.monotonic()
                run_dir = Path(tmp) / sweep.launch.name
                lines: list[list[dict]] = []
                signals: dict[int, dict | None] = {}
                try:
                    lines, signals = run_engines(sweep.launch, args, run_dir, sweep.engine_env())
                finally:
                    results["rows"] += rows(sweep, lines, signals)
                    write_results(args.out, results)
                    keep_logs(run_dir, args.logs, sweep.launch.name)
                done_estimated += estimate_seconds([sweep.launch], args.seconds, args.warmup)
                done_measured += time.monotonic() - began
                log(f"{sweep.launch.name} ({sweep.split_text}) done in {time.monotonic() - began:.0f} s "
                    f"(estimated {estimate_seconds([sweep.launch], args.seconds, args.warmup):.0f} s)")
    print(render(results), end="", flush=True)


if __name__ == "__main__":
    main()
