"""The agent's cycle against its floor (issue 9): each collector's full cycle over the sum of the
calls it cannot do without, done bare, with no agent logic, in the same run.

    python -m benchmarks.floor [--quick] [--rounds N] [--node reference|large] [--full-bodies]
                               [--profile] [--json OUT.json]
        # 100 rounds a node, one every 2 s (--quick: 15); --profile: cProfile of the collectors;
        # --full-bodies: engines serve a full-size vLLM body (tests.kit.fakevllm.full_size_body)

Same nodes as benchmarks/node_cost.py (reference: 1 GPU, 2 engines; large: 8 GPUs, 48 MPS clients
a GPU, 16 engines), same stand-ins: the fake control program in replay mode (`cat` of recorded
replies), NVML the fake replaying a real H200 recording, engines tests/kit/fakevllm.py processes on
loopback serving a real vLLM body. The collectors are the agent's own, built from its configuration
(mpswatch.cli.build_collectors) and called in this process; like an agent under test, they see only
this run's processes (tests.kit.scope.SessionProcesses). Each round, one every 2 s:

  1. the whole cycle as the agent runs it (Scheduler.run_once: the four collectors in parallel,
     the derive step once for their publishes, as the agent's store batches them), its wall time, its CPU time (this
     process's threads, and with the control program runs it waited for), and each collector's own
     duration in it (what the agent exports as mps_exporter_collector_duration_seconds);
  2. each collector alone (`collect()`), then its floor done bare, or the floor first in odd rounds:
       mps_control: the same commands the collector sent this cycle (recorded by wrapping its
                    runner), each a subprocess.run of the same program with the same stdin and env;
       gpu:         the same NVML calls on the same fake NVML (checked against a count of the
                    collector's calls); the fake costs a few µs a call, a real NVML call more;
       engines:     a bare http.client GET of each engine's /metrics, one after the other (the
                    issue's floor); apart, the /proc reads the collector makes (listing, stat and
                    cmdline of every process it sees, the engines' threads' stat and schedstat, environ);
       mps_logs:    none of the issue's kinds: the stat, fstat and preads the log follower makes.
The whole cycle's floor is the sum of the four (the control commands replayed as the parallel
cycle sent them). Ratios are per round (cycle / floor of the same round); medians and p10-p90.
"""

from __future__ import annotations

import cProfile
import http.client
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from mpswatch.cli import DERIVE_AFTER_SECONDS
from mpswatch.collectors.mps_logs import SOURCES
from mpswatch.httpfetch import Pending
from mpswatch.logsetup import configure_logging
from mpswatch.procfs import ProcFS
from mpswatch.runner import run_with_deadline
from mpswatch.scheduler import Scheduler, SnapshotStore

from benchmarks.node_cost import children_cpu_seconds
from tests.kit import fakenvml
from tests.kit.scope import SessionProcesses
from tests.kit.stagednode import NODES, node
from tests.kit.stagednode import collectors as staged_collectors

PERIOD_SECONDS = 2.0  # the agent's default interval
COLLECTORS = ("mps_control", "mps_logs", "gpu", "engines")


# ---------------------------------------------------------------- the agent's collectors


class RecordingRunner:
    """The agent's runner, noting what each call sent (one list append: nothing to measure)."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, ...], bytes, dict[str, str]]] = []

    def __call__(self, argv, stdin, env, timeout, **options):
        self.sent.append((tuple(argv), stdin, dict(env)))
        return run_with_deadline(argv, stdin, env, timeout, **options)

    def take(self) -> list:
        sent, self.sent = self.sent, []
        return sent


class CountingNvml:
    """Counts the NVML calls made through it; used for one cycle only, to check the floor's calls."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):
        value = getattr(self._inner, name)
        if not (name.startswith("nvml") and callable(value)):
            return value

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return value(*args, **kwargs)

        return counted


def agent(setup: dict, visible: SessionProcesses) -> tuple[Scheduler, dict, RecordingRunner]:
    store = SnapshotStore(derive_after_seconds=DERIVE_AFTER_SECONDS)
    collectors = staged_collectors(setup, visible)
    by_name = {c.name: c for c in collectors}
    recorder = RecordingRunner()
    by_name["mps_control"]._runner = recorder  # before its first cycle, which makes the channels
    return Scheduler(collectors, store), by_name, recorder


# ---------------------------------------------------------------- floors: the same calls, bare


def control_floor(sent: list) -> None:
    for argv, stdin, env in sent:
        subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)


class GpuFloor:
    """What the GPU collector asks NVML in a steady cycle, on a fake of the same layout."""

    def __init__(self) -> None:
        self.nvml = fakenvml.from_layout()
        self.nvml.nvmlInit()
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.nvml.nvmlDeviceGetCount())]
        self.samples: list = [None] * len(self.handles)
        nvml = self.nvml
        self.metrics = (nvml.NVML_GPM_METRIC_SM_UTIL, nvml.NVML_GPM_METRIC_SM_OCCUPANCY,
                        nvml.NVML_GPM_METRIC_DRAM_BW_UTIL, nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL)
        self.cmdline_known: set[int] = set()  # non-MPS GPU processes the collector named from /proc

    def __call__(self, nvml=None) -> None:
        nvml = nvml or self.nvml
        nvml.nvmlDeviceGetCount()
        for index, handle in enumerate(self.handles):
            nvml.nvmlDeviceGetComputeMode(handle)
            nvml.nvmlDeviceGetUtilizationRates(handle)
            nvml.nvmlDeviceGetMemoryInfo(handle)
            nvml.nvmlDeviceGetPowerUsage(handle)
            nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            sample = nvml.nvmlGpmSampleAlloc()
            nvml.nvmlGpmSampleGet(handle, sample)
            previous, self.samples[index] = self.samples[index], sample
            if previous is not None:
                query = nvml.c_nvmlGpmMetricsGet_t()
                query.version = nvml.NVML_GPM_METRICS_GET_VERSION
                query.numMetrics = len(self.metrics)
                query.sample1, query.sample2 = previous, sample
                for i, metric in enumerate(self.metrics):
                    query.metrics[i].metricId = metric
                nvml.nvmlGpmMetricsGet(query)
                nvml.nvmlGpmSampleFree(previous)
            compute = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            mps = {p.pid for p in nvml.nvmlDeviceGetMPSComputeRunningProcesses(handle)}
            for process in compute:
                if process.pid not in mps and not os.path.exists(f"/proc/{process.pid}"):
                    try:  # the collector asks NVML for the name only when /proc has no command line
                        nvml.nvmlSystemGetProcessName(process.pid)
                    except nvml.NVMLError:
                        pass

    def calls(self) -> Counter[str]:
        counting = CountingNvml(self.nvml)
        self(counting)
        return counting.calls


def http_floor(urls: list[str]) -> None:
    for url in urls:
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2.0)
        connection.request("GET", parts.path)
        connection.getresponse().read()
        connection.close()


def _read(path: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read()
    except OSError:
        pass


def proc_floor(procfs: ProcFS, root_pids: list[int]) -> None:
    """The /proc reads of the engines collector: the stat and cmdline of every process it sees, then
    each engine's threads' stat and schedstat, its environ, and the CPU pressure."""
    for pid in procfs.pids():
        _read(f"/proc/{pid}/stat")
        _read(f"/proc/{pid}/cmdline")
    for pid in root_pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            _read(f"/proc/{pid}/task/{tid}/stat")
            _read(f"/proc/{pid}/task/{tid}/schedstat")
        _read(f"/proc/{pid}/environ")
    _read("/proc/pressure/cpu")


class LogsFloor:
    """The log follower's system calls on a quiet file: stat of the path, fstat and a 64-byte
    pread of the open file (truncation), a pread at the end (nothing new)."""

    def __init__(self, log_dir: Path) -> None:
        self.paths = [str(log_dir / name) for name in SOURCES.values()]
        self.fds = {}
        for path in self.paths:
            try:
                self.fds[path] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                pass

    def __call__(self) -> None:
        for path in self.paths:
            try:
                os.stat(path)
            except FileNotFoundError:
                continue
            fd = self.fds[path]
            size = os.fstat(fd).st_size
            os.pread(fd, 64, 0)
            os.pread(fd, 1 << 20, size)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def only_ours_up(scheduler: Scheduler, urls: list[str]) -> bool:
    engines = scheduler.store.current().engines
    return (engines is not None and sorted(e.url for e in engines.engines) == urls
            and all(e.up for e in engines.engines))


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def timed_with_cpu(fn) -> tuple[float, float, float]:
    """Wall time, CPU time of this process (all its threads: the collectors'), and CPU time of the
    children it waited for meanwhile (the control program runs)."""
    wall, cpu, children = time.perf_counter(), time.process_time(), children_cpu_seconds()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu, children_cpu_seconds() - children


# ---------------------------------------------------------------- one node


def measure(name: str, rounds: int, profile: bool, full_bodies: bool = False) -> dict:
    with node(name, *NODES[name], full_bodies=full_bodies) as setup:
        visible = SessionProcesses()
        scheduler, collectors, recorder = agent(setup, visible)
        ports = [int(e.args[e.args.index("--port") + 1]) for e in setup["engines"]]
        urls = sorted(f"http://127.0.0.1:{port}/metrics" for port in ports)
        for _ in range(3):  # first cycles: discovery, log backfill, GPM's first sample
            scheduler.run_once()
            time.sleep(0.5)
        if not only_ours_up(scheduler, urls):
            raise RuntimeError(f"{name}: the engines collector does not see exactly this node's engines, all up")
        procfs = ProcFS(visible=visible)
        root_pids = [e.pid for e in setup["engines"]]
        gpu_floor, logs_floor = GpuFloor(), LogsFloor(setup["log_dir"])
        gpu_floor()  # its first GPM sample

        # the floor makes the NVML calls the collector makes, and no others
        gpu = collectors["gpu"]
        real, gpu._nvml = gpu._nvml, CountingNvml(gpu._nvml)
        try:
            gpu.collect()
            collector_calls = gpu._nvml.calls
        finally:
            gpu._nvml = real
        floor_calls = gpu_floor.calls()
        if collector_calls != floor_calls:
            print(f"WARNING {name}: NVML calls differ: collector {dict(collector_calls)} floor {dict(floor_calls)}",
                  file=sys.stderr)

        floors = {
            "gpu": gpu_floor,
            "mps_logs": logs_floor,
            "engines": lambda: http_floor(urls),
        }
        rows: list[dict] = []
        recorder.take()
        index = 0
        while len(rows) < rounds:
            index += 1
            started = time.monotonic()
            row: dict = dict(zip(("whole_wall", "whole_cpu", "whole_children_cpu"), timed_with_cpu(scheduler.run_once)))
            statuses = scheduler.store.current().statuses
            for c in COLLECTORS:
                row[f"{c}_in_whole"] = statuses[c].duration_seconds
                assert statuses[c].success, (c, statuses[c].error_detail)
            whole_sent = recorder.take()
            row["control_commands_in_whole"] = len(whole_sent)
            row["mps_control_floor_whole"] = timed(control_floor, whole_sent)
            for c in COLLECTORS:
                if c == "mps_control":  # the floor replays what the cycle sent: the cycle first
                    row[f"{c}_cycle"] = timed(collectors[c].collect)
                    sent = recorder.take()
                    row["control_commands"] = len(sent)
                    row[f"{c}_floor"] = timed(control_floor, sent)
                    continue
                steps = [("cycle", collectors[c].collect), ("floor", floors[c])]
                for step, fn in (steps if index % 2 == 0 else steps[::-1]):
                    row[f"{c}_{step}"] = timed(fn)
            row["engines_proc"] = timed(proc_floor, procfs, root_pids)
            row["whole_floor"] = row["mps_control_floor_whole"] + sum(row[f"{c}_floor"] for c in COLLECTORS[1:])
            rows.append(row)
            time.sleep(max(0.0, PERIOD_SECONDS - (time.monotonic() - started)))
        profiles = profile_collectors(collectors, scheduler) if profile else {}
        logs_floor.close()
    return {"node": name, "rounds": rows, "nvml_calls": dict(collector_calls),
            "nvml_calls_match": collector_calls == floor_calls, "profiles": profiles}


def profile_collectors(collectors: dict, scheduler: Scheduler, cycles: int = 30) -> dict[str, str]:
    """cProfile of each collector's cycle in this thread (the engines' scrapes run on threads of
    their own: their fetch and parse are profiled through the collector's fetch, called here)."""
    out = {}
    for c in COLLECTORS:
        profiler = cProfile.Profile()
        for _ in range(cycles):
            scheduler.run_once()  # peers and GPM as in a normal cycle
            profiler.enable()
            collectors[c].collect()
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        out[c] = text.getvalue()
    # the engine scrape itself (fetch + parse), which the collector runs on its own threads
    engines = collectors["engines"]
    urls = [e.url for e in scheduler.store.current().engines.engines]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(cycles):
        for url in urls:
            engines.fetcher.run(url, Pending(deadline=time.monotonic() + 2.0))
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    out["engines_scrape_threads"] = text.getvalue()
    return out


# ---------------------------------------------------------------- summary


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9)}


def summarise(result: dict) -> dict:
    rows = result["rounds"]
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    out = {}
    for c in COLLECTORS:
        out[c] = {
            "cycle_ms": spread([v * 1e3 for v in col(f"{c}_cycle")]),
            "in_whole_ms": spread([v * 1e3 for v in col(f"{c}_in_whole")]),
            "floor_ms": spread([v * 1e3 for v in col(f"{c}_floor")]),
            "ratio": spread([r[f"{c}_cycle"] / r[f"{c}_floor"] for r in rows]),
        }
    out["engines"]["proc_ms"] = spread([v * 1e3 for v in col("engines_proc")])
    out["engines"]["ratio_with_proc"] = spread(
        [r["engines_cycle"] / (r["engines_floor"] + r["engines_proc"]) for r in rows])
    out["whole"] = {
        "cycle_ms": spread([v * 1e3 for v in col("whole_wall")]),
        "cpu_ms": spread([v * 1e3 for v in col("whole_cpu")]),
        "cpu_with_children_ms": spread([(r["whole_cpu"] + r["whole_children_cpu"]) * 1e3 for r in rows]),
        "floor_ms": spread([v * 1e3 for v in col("whole_floor")]),
        "ratio": spread([r["whole_wall"] / r["whole_floor"] for r in rows]),
        "sequential_cycle_ms": spread([sum(r[f"{c}_cycle"] for c in COLLECTORS) * 1e3 for r in rows]),
        "sequential_ratio": spread(
            [sum(r[f"{c}_cycle"] for c in COLLECTORS) / sum(r[f"{c}_floor"] for c in COLLECTORS) for r in rows]),
    }
    out["control_commands_per_cycle"] = dict(Counter(col("control_commands")))
    return out


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['p10']:.{digits}f}–{s['p90']:.{digits}f})"


FLOOR_OF = {
    "mps_control": "control program round trips (subprocess.run, same commands)",
    "mps_logs": "stat, fstat, 2 preads a log file (not one of the issue's kinds)",
    "gpu": "NVML calls on the fake (µs each; a real NVML costs more)",
    "engines": "bare http.client GET of each /metrics, one after the other",
}


def table(results: list[dict]) -> str:
    lines = ["| node | collector | cycle alone, ms | in the parallel cycle, ms | floor, ms | floor made of | cycle / floor |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        s = result["summary"]
        for c in COLLECTORS:
            lines.append(f"| {result['node']} | {c} | {fmt(s[c]['cycle_ms'])} | {fmt(s[c]['in_whole_ms'])} | "
                         f"{fmt(s[c]['floor_ms'])} | {FLOOR_OF[c]} | {fmt(s[c]['ratio'])} |")
        e = s["engines"]
        lines.append(f"| {result['node']} | engines, with /proc in the floor | | | "
                     f"{fmt(e['proc_ms'])} + HTTP | the same /proc reads, bare | {fmt(e['ratio_with_proc'])} |")
        w = s["whole"]
        lines.append(f"| {result['node']} | **whole cycle** (as the agent runs it) | | {fmt(w['cycle_ms'])} | "
                     f"{fmt(w['floor_ms'])} | the four floors, summed | **{fmt(w['ratio'])}** |")
        lines.append(f"| {result['node']} | the four cycles one after the other | {fmt(w['sequential_cycle_ms'])} | | "
                     f"{fmt(w['floor_ms'])} | | {fmt(w['sequential_ratio'])} |")
        lines.append(f"| {result['node']} | whole cycle, CPU time: the agent's threads; with the control program runs | | "
                     f"{fmt(w['cpu_ms'])}; {fmt(w['cpu_with_children_ms'])} | | | |")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        print(__doc__)
        return
    rounds = 15 if "--quick" in args else 100
    if "--rounds" in args:
        rounds = int(args[args.index("--rounds") + 1])
    configure_logging("error", "json")  # a fresh agent's first cycles warn (48 clients: the limit)
    names = [args[args.index("--node") + 1]] if "--node" in args else list(NODES)
    results = []
    for name in names:
        result = measure(name, rounds, "--profile" in args, "--full-bodies" in args)
        result["summary"] = summarise(result)
        results.append(result)
    report = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "cpus": os.cpu_count(),
              "rounds": rounds, "full_bodies": "--full-bodies" in args, "results": results}
    if "--json" in args:
        Path(args[args.index("--json") + 1]).write_text(json.dumps(report, indent=1))
    for result in results:
        print(f"\n## {result['node']}: NVML calls a cycle {sum(result['nvml_calls'].values())} "
              f"(floor's match: {result['nvml_calls_match']}); control commands a cycle "
              f"{result['summary']['control_commands_per_cycle']}")
        for c, text in result["profiles"].items():
            print(f"\n### cProfile, {result['node']}, {c}\n{text}")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
