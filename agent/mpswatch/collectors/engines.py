"""Engines collector: inference engines on the node, their load and CPU stalls, and where their
processes ask MPS to attach.

Engines are configured (a URL) or found from their command lines (engine_kinds); each is scraped on
its own thread with a deadline and a body cap (httpfetch), and its process tree's CPU time is read
from /proc. What needs the other collectors (its GPU, MPS attachment, whether a daemon serves its
pipe dir, its share of the GPU's load) is joined by mpswatch.derive.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import structlog

from mpswatch.collectors import CollectorUnit
from mpswatch.collectors.mps_control import DEFAULT_PIPE_DIR
from mpswatch.engine_kinds import AUTO, KINDS, REJECT_REASONS, EngineSample, parameters_from_model_name
from mpswatch.engine_kinds.kinds import parse_engine_command, parse_engine_metrics
from mpswatch.httpfetch import BackgroundFetcher, Fetch, Pending, fetch_metrics, redact_url
from mpswatch.interference import Interference
from mpswatch.latency import DEFAULT_WINDOW_SECONDS, QUANTILES, LatencyFigures, LatencyWindow
from mpswatch.metrics import Families
from mpswatch.netns import find_endpoint
from mpswatch.procfs import (
    ProcessRow,
    ProcFS,
    descendants,
    parse_pressure,
    process_table,
    schedstat_wait_ns,
    stat_cpu_ticks,
    unreadable_reason,
)
from mpswatch.snapshot import DerivedFacts, EnginesData, EngineState, MpsLimit, frozen_map
from mpswatch.verdicts import DEGRADED, DOWN, OK, StatusSection, count, in_pod, percent, pod_name, problem

CPU_BOUND_THREAD_RATIO = 0.9
MAX_THREADS_PER_ENGINE = 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")


def tokens_per_second(
    previous: tuple[float, Mapping[tuple[Any, ...], float]] | None, current: tuple[float, Mapping[tuple[Any, ...], float]] | None
) -> float | None:
    """(monotonic time, token counter per series) pairs. Each series on its own: one that went
    back (a restart) counts from zero, one that appeared or vanished adds nothing."""
    if previous is None or current is None or current[0] <= previous[0] or not current[1]:
        return None
    delta = 0.0
    for key, value in current[1].items():
        before = previous[1].get(key)
        if before is not None:
            delta += value - before if value >= before else value
    return delta / (current[0] - previous[0])


@dataclass
class _Accumulator:
    """A counter summed over processes or threads that come and go: it never goes back."""

    last: dict[Any, int] = field(default_factory=dict)
    total: int = 0

    def update(self, values: Mapping[Any, int], alive: Callable[[Any], bool]) -> int:
        """`alive(key)`: whether a key not read this time still exists (and will be read again)."""
        for key, value in values.items():
            before = self.last.get(key)
            self.total += value if before is None else max(0, value - before)
        self.last = {key: value for key, value in self.last.items() if key in values or alive(key)}
        self.last.update(values)
        return self.total


@dataclass
class _Engine:
    name: str  # the `engine` label; "" until a discovered engine is first reported
    url: str | None  # where it is scraped: configured (userinfo and all), or chosen from its sockets (None: unreachable)
    found_by: str
    gpu_uuid: str | None = None  # as configured
    kind: str = AUTO  # configured, or its command line's; AUTO: recognised from its body
    kind_seen: str | None = None  # the kind its last answer was read as
    root_pid: int | None = None
    start_time: int | None = None  # of a discovered engine's API server: with its PID, its identity
    port: int | None = None  # a discovered engine's port, from its command line
    base_name: str = ""  # a discovered engine's `<served name>:<port>`
    unreachable: str | None = None  # why a discovered engine cannot be scraped
    shared_netns: bool | None = None  # a discovered engine runs in the agent's network namespace
    down: str | None = None  # why its last scrape failed
    model: str | None = None  # kept while the engine is down, so its info labels do not churn
    command_model: str | None = None  # the model its command line serves (the label is often a served name)
    previous_tokens: tuple[float, Mapping[tuple[Any, ...], float]] | None = None
    cpu: _Accumulator = field(default_factory=_Accumulator)
    wait: _Accumulator = field(default_factory=_Accumulator)
    thread_ticks: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))  # samples refused, ever
    rejecting: tuple[str, ...] = ()  # why samples of its last answer were refused
    latency: LatencyWindow = field(default_factory=LatencyWindow)  # its latency histograms, last window

    @property
    def local_port(self) -> int | None:
        """The port of a configured URL on this host: the vLLM process it names is ours to find."""
        return _port(self.url) if self.url and (urlsplit(self.url).hostname or "") in LOCAL_HOSTS else None


def _port(url: str) -> int | None:
    parts = urlsplit(url)
    try:
        return parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None


def _shown(url: str | None) -> str | None:
    """A URL as exported, logged and shown: without its userinfo (credentials)."""
    return None if url is None else redact_url(url)


def _endpoint(url: str | None) -> tuple[str, int | None] | None:
    return None if url is None else ((urlsplit(url).hostname or ""), _port(url))


def engine_labels(taken: Iterable[str], base_name: str, pid: int) -> Iterator[str]:
    """The `engine` label values a discovered engine may take, best first: `<name>:<port>`, then,
    while another engine holds that, `<name>:<port>@pid<PID>` (and `~2`, `~3`... after it should
    a configured name take even that)."""
    taken = set(taken)
    candidates = itertools.chain((base_name, f"{base_name}@pid{pid}"),
                                 (f"{base_name}@pid{pid}~{n}" for n in itertools.count(2)))
    return (label for label in candidates if label not in taken)


class EnginesCollector:
    name = "engines"

    def __init__(
        self,
        *,
        configured: Iterable[Mapping[str, str]] = (),
        discover: bool = True,
        interval_seconds: float = 2.0,
        timeout_seconds: float = 2.0,
        max_body_bytes: int = 4 << 20,
        latency_window_seconds: float = DEFAULT_WINDOW_SECONDS,
        procfs: ProcFS | None = None,
        fetch: Fetch = fetch_metrics,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.deadline_seconds = timeout_seconds + 3.0
        self._discover = discover
        self._timeout = timeout_seconds
        self._latency_window = latency_window_seconds
        self._procfs = procfs or ProcFS()
        self.fetcher = BackgroundFetcher(parse_engine_metrics, timeout_seconds, max_body_bytes, fetch)
        self._configured = [_Engine(e["name"], e["url"], "configured", e.get("gpu_uuid"), e.get("kind", AUTO),
                                    latency=LatencyWindow(latency_window_seconds)) for e in configured]
        self._parsers = {kind: functools.partial(parse_engine_metrics, kind=kind) for kind in KINDS}
        self._processes: dict[tuple[int, int | None], _Engine] = {}  # vLLM API servers by PID and start time
        self._log = structlog.get_logger().bind(collector=self.name)

    # -- the cycle

    def collect(self) -> EnginesData:
        processes = process_table(self._procfs)
        engines = self._find_engines(processes)
        self.fetcher.forget({engine.url for engine in engines if engine.url})
        scrapes = [(engine, self.fetcher.start(engine.url, self._parsers.get(engine.kind)) if engine.url else None)
                   for engine in engines]
        deadline = time.monotonic() + self._timeout + 0.2
        for _, scrape in scrapes:
            if scrape is not None:
                scrape.done.wait(max(0.0, deadline - time.monotonic()))
        unreadable: dict[int, str] = {}  # engine PID -> why its environment could not be read
        states = [self._with_processes(engine, self._scraped(engine, scrape), processes, unreadable)
                  for engine, scrape in sorted(scrapes, key=lambda pair: pair[0].name)]
        pressure = parse_pressure(self._procfs.read_text("pressure/cpu") or "")
        counts = {"permission": 0}
        for reason in unreadable.values():
            counts[reason] = counts.get(reason, 0) + 1
        notes = (f"cannot read the environment of engine pid {', '.join(map(str, sorted(unreadable)))} to find its "
                 "CUDA_MPS_* settings (needs root with CAP_SYS_PTRACE and, for another user's process, "
                 "CAP_DAC_READ_SEARCH: deploy/README.md)",) if unreadable else ()
        return EnginesData(engines=tuple(states), cpu_pressure=frozen_map(pressure), notes=notes,
                           unreadable_environments=frozen_map(counts))

    def _find_engines(self, processes: Mapping[int, ProcessRow]) -> list[_Engine]:
        """The configured engines, each tied to its process, and (with discovery) every other engine's
        API server (engine_kinds), each by its own process: never two merged for a shared name or port."""
        if not self._discover and not self._configured:
            return []
        found = {}
        for pid, row in sorted(processes.items()):
            command = parse_engine_command(row.argv)
            if command is not None:
                found[(pid, row.start_time)] = command
        for key in set(self._processes) - set(found):  # exited, or its PID now runs something else
            gone = self._processes.pop(key)
            if gone.name:
                self._log.info("engine_gone", engine=gone.name, pid=key[0])
        for (pid, start_time), command in found.items():
            engine = self._processes.get((pid, start_time))
            if engine is None:
                engine = self._processes[(pid, start_time)] = _Engine(
                    "", None, "discovered", kind=command.kind, root_pid=pid, start_time=start_time, port=command.port,
                    base_name=command.name, command_model=command.model, latency=LatencyWindow(self._latency_window))
            if engine.url is None or engine.down is not None:  # its address is kept while it answers
                self._reach(engine, pid, command.port, processes)
        claimed = {id(engine): engine for engine in map(self._claim, self._configured) if engine is not None}
        for engine in claimed.values():
            engine.name = ""  # reported under the configured name; should it be let go, it takes a label anew
        if not self._discover:
            return list(self._configured)
        unclaimed = [engine for engine in self._processes.values() if id(engine) not in claimed]
        taken = {engine.name for engine in self._configured if engine.name}
        # labels already given are kept; new engines take theirs in the order their processes started
        for engine in sorted(unclaimed, key=lambda e: (not e.name, e.start_time or 0, e.root_pid or 0)):
            if not engine.name or engine.name in taken:
                engine.name = next(engine_labels(taken, engine.base_name, engine.root_pid or 0))
                self._log.info("engine_discovered", engine=engine.name, url=_shown(engine.url), pid=engine.root_pid)
            taken.add(engine.name)
        return [*self._configured, *unclaimed]

    def _reach(self, engine: _Engine, pid: int, port: int, processes: Mapping[int, ProcessRow]) -> None:
        reach = find_endpoint(self._procfs, pid, descendants(pid, processes), port)
        if reach.unreadable_lines:
            self._log.warning("net_table_lines_unreadable", pid=pid, lines=reach.unreadable_lines)
        engine.url, engine.unreachable, engine.shared_netns = reach.url, reach.reason, reach.shared

    def _claim(self, configured: _Engine) -> _Engine | None:
        """The discovered process a configured engine names: on a URL on this host, the API server with
        that port in the agent's network namespace (or one that cannot be told apart, the earliest
        PID first); on any other URL, the one the agent would scrape at the same host and port."""
        port = configured.local_port
        if port is not None:
            candidates = [e for e in self._processes.values() if e.port == port and e.shared_netns is not False]
            candidates.sort(key=lambda e: (e.shared_netns is not True, e.root_pid or 0))
        else:
            candidates = [e for e in self._processes.values()
                          if e.url is not None and _endpoint(e.url) == _endpoint(configured.url)]
        claimed = candidates[0] if candidates else None
        configured.root_pid = claimed.root_pid if claimed else None
        configured.command_model = claimed.command_model if claimed else None
        return claimed

    def _scraped(self, engine: _Engine, scrape: Pending[EngineSample] | None) -> EngineState:
        base = EngineState(name=engine.name, url=_shown(engine.url), found_by=engine.found_by, up=False,
                           kind=engine.kind_seen or (None if engine.kind == AUTO else engine.kind),
                           gpu_uuid=engine.gpu_uuid, model=engine.model, rejected_samples_total=frozen_map(engine.rejected))
        if scrape is None:
            return self._down_state(engine, base, engine.unreachable or "no address to scrape")
        if not scrape.done.is_set():
            return self._down_state(engine, base, f"no answer within {self._timeout:g} s")
        sample = scrape.value
        if sample is None:
            return self._down_state(engine, base, scrape.error or "no answer")
        if engine.down is not None:
            self._log.info("engine_up", engine=engine.name)
            engine.down = None
        self._count_rejected(engine, sample.rejected)
        tokens = (scrape.fetched_at, sample.token_series) if sample.token_series else None
        tps = tokens_per_second(engine.previous_tokens, tokens)
        if tokens is not None and (engine.previous_tokens is None or tokens[0] > engine.previous_tokens[0]):
            engine.previous_tokens = tokens
        engine.model = sample.model or engine.model or engine.command_model  # llama.cpp's and TGI's name none
        engine.kind_seen = sample.kind
        if engine.latency.add(scrape.fetched_at, sample.latencies):
            self._log.info("engine_latency_window_restarted", engine=engine.name,
                           reason="a latency histogram went back or changed its buckets")
        latencies = engine.latency.figures()
        return replace(
            base,
            up=True,
            kind=sample.kind,
            rejected_samples_total=frozen_map(engine.rejected),
            rejected_reasons=engine.rejecting,
            model=engine.model,
            requests_running=sample.requests_running,
            requests_waiting=sample.requests_waiting,
            prompt_tokens_total=sample.prompt_tokens_total,
            generation_tokens_total=sample.generation_tokens_total,
            preemptions_total=sample.preemptions_total,
            tokens_per_second=tps,
            kv_cache_usage_ratio=sample.kv_cache_usage_ratio,
            gpu_memory_utilization=sample.gpu_memory_utilization,
            prompt_tokens_per_request=sample.prompt_tokens_per_request,
            generation_tokens_per_request=sample.generation_tokens_per_request,
            model_parameters=parameters_from_model_name(engine.command_model) or parameters_from_model_name(engine.model),
            latencies=frozen_map(latencies),
            latency_window_seconds=engine.latency.span_seconds if latencies else None,
            latency_histograms=tuple(sorted(sample.latencies)),
            latency_totals=frozen_map({name: (h.sum, h.count) for name, h in sample.latencies.items()}),
            scraped_at=scrape.fetched_at,
        )

    def _count_rejected(self, engine: _Engine, rejected: Mapping[str, int]) -> None:
        """Adds up the samples an answer had refused; says so when the reasons change, not every scrape."""
        for reason, samples in rejected.items():
            engine.rejected[reason] = engine.rejected.get(reason, 0) + samples
        reasons = tuple(sorted(reason for reason, samples in rejected.items() if samples))
        if reasons != engine.rejecting:
            if reasons:
                self._log.warning("engine_samples_rejected", engine=engine.name, reasons=",".join(reasons),
                                  samples=sum(rejected.values()))
            else:
                self._log.info("engine_samples_accepted", engine=engine.name)
        engine.rejecting = reasons

    def _down_state(self, engine: _Engine, base: EngineState, reason: str) -> EngineState:
        if engine.down != reason:
            self._log.warning("engine_down", engine=base.name, url=base.url, pid=engine.root_pid, reason=reason)
        engine.down = reason
        return replace(base, error=reason)

    def _with_processes(self, engine: _Engine, state: EngineState, processes: Mapping[int, ProcessRow],
                        unreadable: dict[int, str]) -> EngineState:
        if engine.root_pid is None:
            return state
        pids = descendants(engine.root_pid, processes)
        cpu = self._cpu(engine, pids, processes)
        busy = cpu.get("busiest")
        load = (state.requests_running or 0) + (state.requests_waiting or 0) if state.up else None
        try:
            env = self._procfs.environ(engine.root_pid)
        except OSError as err:
            env = None
            unreadable[engine.root_pid] = unreadable_reason(err)
        pipe_dir = os.path.normpath(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR) if env is not None else None
        return replace(
            state,
            pids=tuple(pids),
            owner_uid=self._procfs.uid(engine.root_pid),
            cpu_seconds_total=cpu.get("cpu_seconds"),
            busiest_thread_cpu_ratio=busy,
            runqueue_wait_seconds_total=cpu.get("wait_seconds"),
            cpu_bound=None if busy is None or load is None else bool(busy >= CPU_BOUND_THREAD_RATIO and load > 0),
            mps_pipe_dir=pipe_dir,
            mps_pipe_dir_set=None if env is None else bool(env.get("CUDA_MPS_PIPE_DIRECTORY")),
            mps_active_thread_percentage=env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") if env else None,
            mps_pinned_device_mem_limit=env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT") if env else None,
        )

    def _cpu(self, engine: _Engine, pids: list[int], processes: Mapping[int, ProcessRow]) -> dict[str, float]:
        """CPU seconds of every process; run-queue wait and the busiest thread's share of a core
        over at most MAX_THREADS_PER_ENGINE threads, each process's main thread first."""
        now = time.monotonic()
        process_ticks: dict[tuple[int, int | None], int] = {}
        wait_ns: dict[tuple[int, int | None, int], int] = {}
        thread_ticks: dict[tuple[int, int], tuple[float, int]] = {}
        busiest = None
        budget = MAX_THREADS_PER_ENGINE
        for pid in pids:
            started, ticks = processes[pid].start_time, processes[pid].cpu_ticks  # read in this cycle's pass
            if ticks is not None:
                process_ticks[(pid, started)] = ticks
            tids = sorted(self._procfs.tasks(pid), key=lambda tid: tid != pid)[: max(budget, 1)]
            budget -= len(tids)
            for tid in tids:
                tick = stat_cpu_ticks(self._procfs.read_text(f"{pid}/task/{tid}/stat") or "")
                if tick is not None:
                    thread_ticks[(pid, tid)] = (now, tick)
                    before = engine.thread_ticks.get((pid, tid))
                    if before is not None and now > before[0]:
                        ratio = (tick - before[1]) / CLOCK_TICKS / (now - before[0])
                        busiest = ratio if busiest is None else max(busiest, ratio)
                waited = schedstat_wait_ns(self._procfs.read_text(f"{pid}/task/{tid}/schedstat") or "")
                if waited is not None:
                    wait_ns[(pid, started, tid)] = waited
        engine.thread_ticks = thread_ticks

        def alive(key: tuple[Any, ...]) -> bool:  # its process still runs (a thread skipped by the budget comes back)
            return key[0] in processes and processes[key[0]].start_time == key[1]

        out: dict[str, float] = {}
        if process_ticks:
            out["cpu_seconds"] = engine.cpu.update(process_ticks, alive) / CLOCK_TICKS
        if wait_ns:
            out["wait_seconds"] = engine.wait.update(wait_ns, alive) / 1e9
        if busiest is not None:
            out["busiest"] = max(0.0, busiest)
        return out




# ---------------------------------------------------------------- metrics and status

_VALUES = {
    "mps_engine_requests_running": "requests_running",
    "mps_engine_requests_waiting": "requests_waiting",
    "mps_engine_prompt_tokens_total": "prompt_tokens_total",
    "mps_engine_generation_tokens_total": "generation_tokens_total",
    "mps_engine_preemptions_total": "preemptions_total",
    "mps_engine_tokens_per_second": "tokens_per_second",
    "mps_engine_kv_cache_usage_ratio": "kv_cache_usage_ratio",
    "mps_engine_cpu_seconds_total": "cpu_seconds_total",
    "mps_engine_busiest_thread_cpu_ratio": "busiest_thread_cpu_ratio",
    "mps_engine_runqueue_wait_seconds_total": "runqueue_wait_seconds_total",
    "mps_engine_prompt_tokens_per_request": "prompt_tokens_per_request",
    "mps_engine_generation_tokens_per_request": "generation_tokens_per_request",
    "mps_engine_model_parameters": "model_parameters",
}


def render(data: EnginesData, facts: DerivedFacts, out: Families) -> None:
    """From the joined engines (facts.engines): their GPU and MPS attachment are labels and values here."""
    for e in facts.engines:
        out.add("mps_engine_info", [e.name, e.model or "", e.url or "", e.gpu_uuid or "", e.kind or ""], 1)
        out.add("mps_engine_up", [e.name], 1 if e.up else 0)
        if e.owner_uid is not None:
            out.add("mps_engine_owner_info", [e.name, e.owner_uid], 1)
        for reason, samples in sorted(e.rejected_samples_total.items()):
            out.add("mps_engine_scrape_rejected_samples_total", [e.name, reason], samples)
        for metric, attribute in _VALUES.items():
            value = getattr(e, attribute)
            if value is not None:
                out.add(metric, [e.name], value)
        for metric, flag in (("mps_engine_mps_attached", e.mps_attached), ("mps_engine_cpu_bound", e.cpu_bound),
                             ("mps_engine_pipe_dir_served", e.pipe_dir_served)):
            if flag is not None:
                out.add(metric, [e.name], 1 if flag else 0)
        if e.latency_window_seconds is not None:
            out.add("mps_engine_latency_window_seconds", [e.name], e.latency_window_seconds)
        for latency, found in sorted(e.latencies.items()):
            for q, seconds in sorted(found.quantiles.items()):
                out.add(f"mps_engine_latency_p{q * 100:g}_seconds", [e.name, latency], seconds)
            if found.mean is not None:
                out.add("mps_engine_latency_mean_seconds", [e.name, latency], found.mean)
        if (found_interference := facts.interference.get(e.name)) is not None:
            _render_interference(e.name, found_interference, out)
        if e.load_share_ratio is not None:
            out.add("mps_engine_load_share_ratio", [e.name, e.gpu_uuid or ""], e.load_share_ratio)
        if e.gpu_memory_utilization is not None:
            out.add("mps_engine_gpu_memory_utilization_ratio", [e.name, e.gpu_uuid or ""], e.gpu_memory_utilization)
        if e.mps_pipe_dir is not None:
            settings = [e.name, e.mps_pipe_dir, e.mps_active_thread_percentage or "", e.mps_pinned_device_mem_limit or ""]
            out.add("mps_engine_mps_settings_info", settings, 1)
        for metric, limit in (("mps_engine_active_thread_ratio", e.active_thread_limit),
                              ("mps_engine_pinned_device_memory_limit_bytes", e.pinned_memory_limit)):
            if limit is not None and limit.value is not None and limit.source is not None:
                out.add(metric, [e.name, limit.source], limit.value)
    for gpu_uuid, ratio in sorted(facts.imbalance.items()):
        out.add("mps_gpu_engine_imbalance_ratio", [gpu_uuid], ratio)
    for window, ratio in sorted(data.cpu_pressure.items()):
        out.add("mps_host_cpu_pressure_ratio", [window], ratio)
    for reason, processes in sorted(data.unreadable_environments.items()):
        out.add("mps_discovery_unreadable_processes", ["engine", reason], processes)


def _render_interference(engine: str, found: Interference, out: Families) -> None:
    if found.baseline_seconds is not None:
        out.add("mps_engine_inter_token_latency_baseline_seconds", [engine], found.baseline_seconds)
    if found.slowdown_ratio is not None:
        out.add("mps_engine_inter_token_latency_slowdown_ratio", [engine], found.slowdown_ratio)
    if found.bursting is not None:
        out.add("mps_engine_burst", [engine], 1 if found.bursting else 0)
    if found.neighbour is not None and found.slowdown_ratio is not None:
        out.add("mps_engine_interference_slowdown_ratio", [engine, found.neighbour], found.slowdown_ratio)


def status(data: EnginesData, facts: DerivedFacts, now: float) -> StatusSection:
    engines = [{**_engine_entry(e, facts.interference.get(e.name)), "pod": pod_name(facts.engine_pods.get(e.name))}
               for e in facts.engines]
    engine_gpus = _engine_gpus(facts.imbalance, engines)
    problems = [problem(g["verdict"], "engine_gpu", f"engines on {g['gpu_uuid'] or 'an unknown GPU'}", g["reason"])
                for g in engine_gpus if g["verdict"] != OK]
    problems += [problem(e["verdict"], "engine", f"engine {e['name']}{in_pod(e['pod'])}", e["reason"])
                 for e in engines if e["verdict"] != OK]
    return StatusSection({"engines": engines, "engine_gpus": engine_gpus}, tuple(problems), data.notes,
                         needs_two_samples=_needs_two_samples(facts.engines))


def _needs_two_samples(engines: tuple[EngineState, ...]) -> tuple[str, ...]:
    """The figures shown as `?` because they are rates over two samples and only one was taken."""
    figures = []
    if any(e.up and e.tokens_per_second is None for e in engines):
        figures += ["tokens/s", "load shares", "imbalance"]
    if any(e.pids and e.busiest_thread_cpu_ratio is None for e in engines):
        figures.append("busiest thread")
    if any(e.up and e.latency_histograms and e.latency_window_seconds is None for e in engines):
        figures.append("latency")
    return tuple(figures)


def _engine_entry(e: EngineState, interference: Interference | None) -> dict[str, Any]:
    if not e.up:
        verdict, reason = DOWN, f"metrics endpoint: {e.error}"
    else:
        problems = []
        if e.mps_attached is False:
            problems.append("runs on the GPU without MPS")
        if e.pipe_dir_served is False:
            problems.append(f"its CUDA_MPS_PIPE_DIRECTORY {e.mps_pipe_dir} is {e.pipe_dir_served_detail}")
        if e.rejected_reasons:
            problems.append(f"its metrics had values refused ({', '.join(e.rejected_reasons)}): those figures are unknown")
        if e.cpu_bound:
            problems.append(f"CPU-bound: busiest thread at {percent(e.busiest_thread_cpu_ratio)} of a core")
        if interference is not None and interference.neighbour is not None:
            problems.append(f"slowed by a noisy neighbour: {interference.detail}")
        attached = {True: "MPS attached", False: "not under MPS", None: "MPS attachment unknown"}[e.mps_attached]
        tps = "?" if e.tokens_per_second is None else f"{e.tokens_per_second:.0f}"
        figures = (f"share {percent(e.load_share_ratio)}, {tps} tok/s, running {count(e.requests_running)}, "
                   f"waiting {count(e.requests_waiting)}, {attached}, busiest thread {percent(e.busiest_thread_cpu_ratio)}")
        figures += f", {_latency_text(e)}"
        if interference is not None and interference.neighbour is None:
            figures += f"; {interference.detail}"
        if e.pipe_dir_served is None and e.pipe_dir_served_detail is not None:
            figures += f"; pipe dir {e.mps_pipe_dir} served? {e.pipe_dir_served_detail}"
        if e.active_thread_limit is not None:
            figures += f"; MPS active threads {e.active_thread_limit.detail}"
        if e.pinned_memory_limit is not None:
            figures += f"; MPS pinned memory {e.pinned_memory_limit.detail}"
        verdict = DEGRADED if problems else OK
        reason = "; ".join([*problems, figures])
    if e.owner_uid not in (None, 0):  # another user's claim: its name and figures are what it chose to show
        reason += f"; runs as uid {e.owner_uid}"
    return {
        "name": e.name,
        "url": e.url,
        "found_by": e.found_by,
        "kind": e.kind,
        "model": e.model,
        "gpu_uuid": e.gpu_uuid,
        "pids": list(e.pids),
        "owner_uid": e.owner_uid,
        "up": e.up,
        "mps_attached": e.mps_attached,
        "load_share_ratio": e.load_share_ratio,
        "tokens_per_second": e.tokens_per_second,
        "requests_running": e.requests_running,
        "requests_waiting": e.requests_waiting,
        "busiest_thread_cpu_ratio": e.busiest_thread_cpu_ratio,
        "cpu_bound": e.cpu_bound,
        "pipe_dir": e.mps_pipe_dir,
        "pipe_dir_served": e.pipe_dir_served,
        "pipe_dir_served_detail": e.pipe_dir_served_detail,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "latency_window_seconds": e.latency_window_seconds,
        "latencies": {name: _latency_entry(found) for name, found in sorted(e.latencies.items())},
        "interference": _interference_entry(interference),
        "active_thread_limit": _limit_entry(e.active_thread_limit, "ratio"),
        "pinned_memory_limit": _limit_entry(e.pinned_memory_limit, "bytes"),
        "verdict": verdict,
        "reason": reason,
    }


def _latency_text(e: EngineState) -> str:
    """TTFT and ITL p50/p99 in milliseconds over the window; `?` where unknown: before two scrapes
    (a one-shot status), without the histogram, or with no request observed in the window."""
    if not e.latency_histograms:
        return "no latency histograms"
    parts = []
    for label, latency in (("TTFT", "time_to_first_token"), ("ITL", "inter_token")):
        found = e.latencies.get(latency)
        quantiles = found.quantiles if found is not None else {}
        shown = "/".join("?" if q not in quantiles else f"{quantiles[q] * 1000:.0f}" for q in QUANTILES)
        parts.append(f"{label} p50/p99 {shown} ms")
    window = "" if e.latency_window_seconds is None else f" over {e.latency_window_seconds:.0f} s"
    return ", ".join(parts) + window


def _latency_entry(found: LatencyFigures) -> dict[str, float | None]:
    return {**{f"p{q * 100:g}": found.quantiles.get(q) for q in QUANTILES}, "mean": found.mean}


def _interference_entry(found: Interference | None) -> dict[str, Any] | None:
    if found is None:
        return None
    return {"inter_token_seconds": found.inter_token_seconds, "baseline_seconds": found.baseline_seconds,
            "slowdown_ratio": found.slowdown_ratio, "bursting": found.bursting,
            "prompt_tokens_per_second": found.prompt_tokens_per_second, "neighbour": found.neighbour,
            "neighbour_prompt_tokens_per_second": found.neighbour_prompt_tokens_per_second, "detail": found.detail}


def _limit_entry(limit: MpsLimit | None, unit: str) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {unit: limit.value, "source": limit.source, "detail": limit.detail}


def _engine_gpus(imbalances: Mapping[str, float], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["gpu_uuid"], []).append(entry)
    out = []
    for gpu_uuid, engines in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):  # unknown last
        shares = [e["gpu_memory_utilization"] for e in engines if e["gpu_memory_utilization"] is not None]
        memory_sum = sum(shares) if shares and gpu_uuid is not None else None  # unknown GPUs: nothing to add up
        imbalance = imbalances.get(gpu_uuid) if gpu_uuid else None
        if memory_sum is not None and memory_sum > 1.0:
            verdict, reason = DEGRADED, f"the engines' gpu_memory_utilization add up to {memory_sum:.2f} > 1"
        else:
            verdict = OK
            reason = f"{len(engines)} engine(s), imbalance {'?' if imbalance is None else f'{imbalance:.2f}'}"
        out.append({"gpu_uuid": gpu_uuid, "imbalance_ratio": imbalance, "memory_utilization_sum": memory_sum,
                    "verdict": verdict, "reason": reason, "engines": [e["name"] for e in engines]})
    return out


UNIT = CollectorUnit("engines", render, status)
