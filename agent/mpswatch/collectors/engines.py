"""Engines collector: vLLM engines on the node, their load, MPS attachment and CPU stalls.

Pure parts first (vLLM /metrics text, vLLM command lines, /proc CPU figures, load balance);
then the shell that finds engines, scrapes them concurrently with a deadline and a body cap,
and reads their processes' CPU time. GPU processes and MPS clients come from the other
collectors' latest snapshot, injected as `peers`.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import structlog
from prometheus_client.parser import text_string_to_metric_families

from mpswatch.collectors.mps_control import DEFAULT_PIPE_DIR
from mpswatch.procfs import ProcFS
from mpswatch.snapshot import EngineState, EnginesData, GpuData, MpsControlData, NodeSnapshot, frozen_map

VLLM_DEFAULT_PORT = 8000
CPU_BOUND_THREAD_RATIO = 0.9
MAX_THREADS_PER_ENGINE = 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BadMetrics(ValueError):
    pass


# ---------------------------------------------------------------- vLLM /metrics


@dataclass(frozen=True)
class VllmSample:
    model: str | None
    requests_running: float | None
    requests_waiting: float | None
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    kv_cache_usage_ratio: float | None
    gpu_memory_utilization: float | None
    token_series: Mapping[tuple, float] = field(default_factory=dict)  # each token counter series on its own
    prompt_tokens_per_request: float | None = None
    generation_tokens_per_request: float | None = None


def parse_vllm_metrics(text: str) -> VllmSample:
    """Sums over vLLM's label sets (several engines or models behind one server). Knows the
    current names and the older `vllm:gpu_cache_usage_perc`; refuses text with no vLLM metric."""
    sums: dict[str, float] = {}
    kv_values: list[float] = []
    series: dict[tuple, float] = {}
    model = gpu_memory_utilization = None
    found = False
    try:
        # only the lines read below; a body with none of them is parsed whole, to say what is wrong
        for family in text_string_to_metric_families(_lines_read(text) or text):
            if not family.name.startswith("vllm:"):
                continue
            found = True
            for sample in family.samples:
                model = model or sample.labels.get("model_name")
                if sample.name == "vllm:cache_config_info" and "gpu_memory_utilization" in sample.labels:
                    try:
                        gpu_memory_utilization = float(sample.labels["gpu_memory_utilization"])
                    except ValueError:
                        pass
                if sample.name.endswith("_created"):
                    continue
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
                if sample.name in _TOKEN_COUNTERS:
                    series[(sample.name, *sorted(sample.labels.items()))] = sample.value
                if sample.name in _KV_USAGE:
                    kv_values.append(sample.value)
    except Exception as err:  # the parser raises several kinds on malformed text
        raise BadMetrics(f"not Prometheus text: {err}"[:200]) from None
    if not found:
        raise BadMetrics("no vllm: metric in the body")
    kv = sum(kv_values) / len(kv_values) if kv_values else None  # a ratio: averaged over engines, not summed
    return VllmSample(
        model=model,
        requests_running=sums.get("vllm:num_requests_running"),
        requests_waiting=sums.get("vllm:num_requests_waiting"),
        prompt_tokens_total=sums.get("vllm:prompt_tokens_total"),
        generation_tokens_total=sums.get("vllm:generation_tokens_total"),
        kv_cache_usage_ratio=kv,
        gpu_memory_utilization=gpu_memory_utilization,
        token_series=series,
        prompt_tokens_per_request=_mean(sums, "vllm:request_prompt_tokens"),
        generation_tokens_per_request=_mean(sums, "vllm:request_generation_tokens"),
    )


def _mean(sums: dict[str, float], histogram: str) -> float | None:
    """Mean of a vLLM histogram since the engine started; None before its first observation."""
    count = sums.get(histogram + "_count")
    total = sums.get(histogram + "_sum")
    return total / count if count and total is not None and count > 0 else None


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


# What parse_vllm_metrics reads, by sample name, and counters' family names (TYPE lines, samples
# written without _total). A real vLLM body is mostly histogram buckets and http_ and python_
# families (about 400 samples, 45 kB), which prometheus_client's pure-Python parser takes some
# 7 ms to read: 16 engines every 2 s were 6 % of a core (docs/benchmarks.md). These lines: 0.3 ms.
_READ_NAMES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens",
        "vllm:generation_tokens_total",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:request_prompt_tokens_count",
        "vllm:request_prompt_tokens_sum",
        "vllm:request_generation_tokens_count",
        "vllm:request_generation_tokens_sum",
    }
)


def _lines_read(text: str) -> str:
    """The lines (samples, HELP and TYPE) of the metrics in _READ_NAMES; empty when there are none."""
    kept = []
    for line in text.splitlines():
        words = line.split(None, 3)
        if not words:
            continue
        if words[0] == "#":
            name = words[2] if len(words) > 2 and words[1] in ("HELP", "TYPE") else ""
        else:
            name = words[0].split("{", 1)[0]
        if name in _READ_NAMES:
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


_TOKEN_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def tokens_per_second(
    previous: tuple[float, Mapping[tuple, float]] | None, current: tuple[float, Mapping[tuple, float]] | None
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


def load_balance(throughput: Mapping[str, float]) -> tuple[dict[str, float], float | None]:
    """Each engine's share of the GPU's tokens/s and the imbalance: the busiest share over the
    fair share (1 = balanced). Nothing when the GPU has no throughput."""
    total = sum(throughput.values())
    if not throughput or total <= 0:
        return {}, None
    shares = {name: tps / total for name, tps in throughput.items()}
    return shares, max(shares.values()) * len(shares)


# ---------------------------------------------------------------- vLLM command lines


@dataclass(frozen=True)
class VllmCommand:
    host: str
    port: int
    model: str | None
    served_name: str | None

    @property
    def name(self) -> str:
        base = self.served_name or (self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else "vllm")
        return f"{base}:{self.port}"

    @property
    def metrics_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"


def _option(argv: list[str], name: str) -> str | None:
    """The last value given, as argparse takes it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _positional(args: list[str]) -> str | None:
    """The first argument that is not an option or an option's value (`--opt value`)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = "=" not in arg
            continue
        return arg
    return None


def parse_vllm_command(argv: list[str]) -> VllmCommand | None:
    """`vllm serve MODEL ...` or `python -m vllm.entrypoints.openai.api_server --model M ...`;
    None for anything else (including vLLM's own EngineCore children)."""
    model = None
    if "vllm.entrypoints.openai.api_server" in argv:
        model = _option(argv, "--model")
    else:
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "vllm" and argv[i + 1] == "serve":
                model = _positional(argv[i + 2 :]) or _option(argv, "--model")
                break
        else:
            return None
    port_text = _option(argv, "--port")
    try:
        port = int(port_text) if port_text is not None else VLLM_DEFAULT_PORT
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    return VllmCommand(_option(argv, "--host") or "0.0.0.0", port, model, _option(argv, "--served-model-name"))


# ---------------------------------------------------------------- /proc figures


def stat_fields(text: str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else []


def stat_cpu_ticks(text: str) -> int | None:
    return cpu_ticks_of(stat_fields(text))


def ppid_of(fields: list[str]) -> int | None:
    """Field 4 of stat: the parent, for an engine's process tree."""
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def start_time_of(fields: list[str]) -> int | None:
    """Field 22 of stat: when the process started; tells a reused PID from the process before."""
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def cpu_ticks_of(fields: list[str]) -> int | None:
    """utime + stime (fields 14 and 15 of stat)."""
    try:
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


def schedstat_wait_ns(text: str) -> int | None:
    """Second field of schedstat: time spent waiting on a run queue."""
    fields = text.split()
    return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else None


def parse_pressure(text: str) -> dict[str, float]:
    """`some avg10=… avg60=…` of /proc/pressure/cpu as ratios."""
    for line in text.splitlines():
        if line.startswith("some "):
            values = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            out = {}
            for window in ("avg10", "avg60"):
                try:
                    out[window] = float(values[window]) / 100.0
                except (KeyError, ValueError):
                    pass
            return out
    return {}


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


# ---------------------------------------------------------------- collector

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")


@dataclass
class _Scrape:
    """One request in flight, on a daemon thread (a stuck request must never hold up exit)."""

    done: threading.Event = field(default_factory=threading.Event)
    sample: VllmSample | None = None
    error: str | None = None
    fetched_at: float = 0.0  # time.monotonic() when the body had arrived


@dataclass
class _Engine:
    name: str
    url: str
    found_by: str
    gpu_uuid: str | None = None
    root_pid: int | None = None
    model: str | None = None  # kept while the engine is down, so its info labels do not churn
    command_model: str | None = None  # the model its command line serves (the label is often a served name)
    previous_tokens: tuple[float, Mapping[tuple, float]] | None = None
    cpu: _Accumulator = field(default_factory=_Accumulator)
    wait: _Accumulator = field(default_factory=_Accumulator)
    thread_ticks: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)

    @property
    def local_port(self) -> int | None:
        """The port of a configured URL on this host: the vLLM process it names is ours to find."""
        parts = urlsplit(self.url)
        if (parts.hostname or "") not in LOCAL_HOSTS:
            return None
        return parts.port or (443 if parts.scheme == "https" else 80)


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
        peers: Callable[[], NodeSnapshot] | None = None,
        procfs: ProcFS | None = None,
        fetch: Callable[[str, float, int], bytes] | None = None,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.deadline_seconds = timeout_seconds + 3.0
        self.after_others = True  # reads the GPU and MPS collectors' data
        self._discover = discover
        self._timeout = timeout_seconds
        self._max_body = max_body_bytes
        self._peers = peers or (lambda: NodeSnapshot(reports=frozen_map()))
        self._procfs = procfs or ProcFS()
        self._fetch = fetch or fetch_metrics
        self._engines: dict[str, _Engine] = {
            e["name"]: _Engine(e["name"], e["url"], "configured", e.get("gpu_uuid")) for e in configured
        }
        self._scrapes: dict[str, _Scrape] = {}  # by URL: one request in flight per endpoint
        self._down: dict[str, str] = {}
        self._log = structlog.get_logger().bind(collector=self.name)

    # -- the cycle

    def collect(self) -> EnginesData:
        processes = self._process_table()
        self._find_engines(processes)
        scrapes = {name: self._scrape(engine.url) for name, engine in self._engines.items()}
        deadline = time.monotonic() + self._timeout + 0.2
        for scrape in scrapes.values():
            scrape.done.wait(max(0.0, deadline - time.monotonic()))
        peers = self._peers()
        gpu_kinds = _gpu_processes(peers)
        mps_clients = _mps_client_pids(peers)
        served_pipe_dirs = _served_pipe_dirs(peers)
        states = []
        for engine in sorted(self._engines.values(), key=lambda e: e.name):
            state = self._scraped(engine, scrapes[engine.name])
            state = self._with_processes(engine, state, processes, gpu_kinds, mps_clients, served_pipe_dirs)
            engine.gpu_uuid = state.gpu_uuid or engine.gpu_uuid
            states.append(state)
        states, imbalance = _balanced(states)
        pressure = parse_pressure(self._procfs.read_text("pressure/cpu") or "")
        return EnginesData(engines=tuple(states), imbalance=frozen_map(imbalance), cpu_pressure=frozen_map(pressure))

    def _process_table(self) -> dict[int, tuple[int | None, list[str], int | None, int | None]]:
        """pid -> (parent, argv, start time, CPU ticks), from one pass over /proc."""
        table = {}
        for pid in self._procfs.pids():
            stat = self._procfs.read_text(f"{pid}/stat")
            argv = self._procfs.cmdline(pid)
            if stat is not None and argv is not None:
                fields = stat_fields(stat)  # split once, read three times
                table[pid] = (ppid_of(fields), argv, start_time_of(fields), cpu_ticks_of(fields))
        return table

    def _find_engines(self, processes: Mapping[int, tuple]) -> None:
        by_port: dict[int, tuple[int, VllmCommand]] = {}
        for pid, (_, argv, *_) in sorted(processes.items()):
            command = parse_vllm_command(argv)
            if command is not None:
                by_port.setdefault(command.port, (pid, command))
        claimed = set()
        for engine in self._engines.values():
            if engine.found_by == "configured":
                port = engine.local_port
                engine.root_pid, engine.command_model = (by_port[port][0], by_port[port][1].model) \
                    if port in by_port else (None, None)
                claimed.add(port)
        if not self._discover:
            return
        seen = set()
        for port, (pid, command) in by_port.items():
            if port in claimed:
                continue  # a configured engine already names this process
            name = command.name
            engine = self._engines.get(name)
            if engine is not None and engine.found_by == "configured":
                self._log.warning("engine_name_taken", engine=name, url=command.metrics_url)
                continue
            if engine is None or engine.url != command.metrics_url:
                self._log.info("engine_discovered", engine=name, url=command.metrics_url, pid=pid)
                engine = self._engines[name] = _Engine(name, command.metrics_url, "discovered")
            engine.root_pid, engine.command_model = pid, command.model
            seen.add(name)
        for name, engine in list(self._engines.items()):
            if engine.found_by == "discovered" and name not in seen:
                self._log.info("engine_gone", engine=name)  # exited, or its PID now runs something else
                del self._engines[name]
                self._down.pop(name, None)

    def _scrape(self, url: str) -> _Scrape:
        scrape = self._scrapes.get(url)
        if scrape is not None and not scrape.done.is_set():
            return scrape  # still in flight: not asked again
        scrape = self._scrapes[url] = _Scrape()
        threading.Thread(target=self._run_scrape, args=(url, scrape), name="engine-scrape", daemon=True).start()
        return scrape

    def _run_scrape(self, url: str, scrape: _Scrape) -> None:
        try:
            body = self._fetch(url, self._timeout, self._max_body)
            scrape.fetched_at = time.monotonic()
            scrape.sample = parse_vllm_metrics(body.decode("utf-8", "replace"))
        except Exception as err:  # down, refused, HTTP error, too big, too slow, garbage
            scrape.error = str(err)[:200] or type(err).__name__
        finally:
            scrape.done.set()

    def _scraped(self, engine: _Engine, scrape: _Scrape) -> EngineState:
        base = EngineState(name=engine.name, url=engine.url, found_by=engine.found_by, up=False,
                           gpu_uuid=engine.gpu_uuid, model=engine.model)
        if not scrape.done.is_set():
            return self._down_state(base, f"no answer within {self._timeout:g} s")
        sample = scrape.sample
        if sample is None:
            return self._down_state(base, scrape.error or "no answer")
        if self._down.pop(engine.name, None) is not None:
            self._log.info("engine_up", engine=engine.name)
        tokens = (scrape.fetched_at, sample.token_series) if sample.token_series else None
        tps = tokens_per_second(engine.previous_tokens, tokens)
        if tokens is not None and (engine.previous_tokens is None or tokens[0] > engine.previous_tokens[0]):
            engine.previous_tokens = tokens
        engine.model = sample.model or engine.model
        return replace(
            base,
            up=True,
            model=engine.model,
            requests_running=sample.requests_running,
            requests_waiting=sample.requests_waiting,
            prompt_tokens_total=sample.prompt_tokens_total,
            generation_tokens_total=sample.generation_tokens_total,
            tokens_per_second=tps,
            kv_cache_usage_ratio=sample.kv_cache_usage_ratio,
            gpu_memory_utilization=sample.gpu_memory_utilization,
            prompt_tokens_per_request=sample.prompt_tokens_per_request,
            generation_tokens_per_request=sample.generation_tokens_per_request,
            model_parameters=parameters_from_model_name(engine.command_model) or parameters_from_model_name(engine.model),
        )

    def _down_state(self, base: EngineState, reason: str) -> EngineState:
        if self._down.get(base.name) != reason:
            self._log.warning("engine_down", engine=base.name, url=base.url, reason=reason)
        self._down[base.name] = reason
        return replace(base, error=reason)

    def _with_processes(self, engine, state, processes, gpu_kinds, mps_clients, served_pipe_dirs):
        if engine.root_pid is None:
            return state
        pids = _descendants(engine.root_pid, processes)
        on_gpu = [pid for pid in pids if pid in gpu_kinds]
        kinds = {gpu_kinds[pid][1] for pid in on_gpu}
        if "exclusive" in kinds:
            attached: bool | None = False
        elif "mps_client" in kinds or any(pid in mps_clients for pid in pids):
            attached = True
        else:
            attached = None  # no GPU context seen yet (or no GPU data)
        # several GPUs (tensor parallel): the engine is placed on its first one
        gpu_uuid = state.gpu_uuid or next((gpu_kinds[pid][0] for pid in on_gpu), None)
        if gpu_uuid is None:
            gpu_uuid = next((mps_clients[pid] for pid in pids if pid in mps_clients), None)
        cpu = self._cpu(engine, pids, processes)
        busy = cpu.get("busiest")
        load = (state.requests_running or 0) + (state.requests_waiting or 0) if state.up else None
        env = self._environ(engine.root_pid)
        pipe_dir = os.path.normpath(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR) if env is not None else None
        return replace(
            state,
            gpu_uuid=gpu_uuid,
            pids=tuple(pids),
            gpu_pids=tuple(on_gpu),
            mps_attached=attached,
            cpu_seconds_total=cpu.get("cpu_seconds"),
            busiest_thread_cpu_ratio=busy,
            runqueue_wait_seconds_total=cpu.get("wait_seconds"),
            cpu_bound=None if busy is None or load is None else bool(busy >= CPU_BOUND_THREAD_RATIO and load > 0),
            mps_pipe_dir=pipe_dir,
            pipe_dir_served=None if pipe_dir is None or served_pipe_dirs is None else pipe_dir in served_pipe_dirs,
            mps_active_thread_percentage=env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") if env else None,
            mps_pinned_device_mem_limit=env.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT") if env else None,
        )

    def _environ(self, pid: int) -> dict[str, str] | None:
        try:
            return self._procfs.environ(pid)
        except PermissionError:
            return None

    def _cpu(self, engine: _Engine, pids: list[int], processes: Mapping[int, tuple]) -> dict[str, float]:
        """CPU seconds of every process; run-queue wait and the busiest thread's share of a core
        over at most MAX_THREADS_PER_ENGINE threads, each process's main thread first."""
        now = time.monotonic()
        process_ticks: dict[tuple[int, int | None], int] = {}
        wait_ns: dict[tuple[int, int | None, int], int] = {}
        thread_ticks: dict[tuple[int, int], tuple[float, int]] = {}
        busiest = None
        budget = MAX_THREADS_PER_ENGINE
        for pid in pids:
            _, _, started, ticks = processes[pid]  # read in this cycle's pass over /proc
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

        def alive(key: tuple) -> bool:  # its process still runs (a thread skipped by the budget comes back)
            return key[0] in processes and processes[key[0]][2] == key[1]

        out: dict[str, float] = {}
        if process_ticks:
            out["cpu_seconds"] = engine.cpu.update(process_ticks, alive) / CLOCK_TICKS
        if wait_ns:
            out["wait_seconds"] = engine.wait.update(wait_ns, alive) / 1e9
        if busiest is not None:
            out["busiest"] = max(0.0, busiest)
        return out


def fetch_metrics(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET with a deadline on the whole answer, not on each read: a server that trickles a byte
    at a time must not hold the request open for ever."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        connection.request("GET", path + (f"?{parts.query}" if parts.query else ""), headers={"Accept": "text/plain"})
        sock = connection.sock  # getresponse() lets go of it when the server closes after the body
        response = connection.getresponse()
        if response.status != 200:
            raise BadMetrics(f"HTTP {response.status} {response.reason}")
        body = bytearray()
        while not response.isclosed():  # closed once a body of known length is all read
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            try:
                sock.settimeout(left)
            except OSError:
                pass  # the socket went with the finished answer; read1 says what is left
            chunk = response.read1(65536)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise BadMetrics(f"body larger than {max_bytes} bytes")
        return bytes(body)
    except (TimeoutError, socket.timeout):
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    finally:
        connection.close()


def _descendants(root: int, processes: Mapping[int, tuple]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in processes.items():
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack and len(found) < 4096:
        pid = stack.pop()
        if pid in processes and pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return sorted(found)


def _gpu_processes(peers: NodeSnapshot) -> dict[int, tuple[str | None, str]]:
    gpus = peers.data("gpu")
    if not isinstance(gpus, GpuData):
        return {}
    return {p.pid: (g.uuid, p.kind) for g in gpus.gpus for p in g.processes or ()}


def _mps_client_pids(peers: NodeSnapshot) -> dict[int, str]:
    control = peers.data("mps_control")
    if not isinstance(control, MpsControlData):
        return {}
    return {c.pid: c.device for d in control.daemons for c in d.clients or ()}


def _served_pipe_dirs(peers: NodeSnapshot) -> set[str] | None:
    control = peers.data("mps_control")
    if not isinstance(control, MpsControlData):
        return None
    return {d.pipe_dir for d in control.daemons if d.up}


def _balanced(states: list[EngineState]) -> tuple[list[EngineState], dict[str, float]]:
    by_gpu: dict[str, dict[str, float]] = {}
    for state in states:
        if state.up and state.gpu_uuid and state.tokens_per_second is not None:
            by_gpu.setdefault(state.gpu_uuid, {})[state.name] = state.tokens_per_second
    shares: dict[str, float] = {}
    imbalance: dict[str, float] = {}
    for gpu_uuid, throughput in by_gpu.items():
        gpu_shares, ratio = load_balance(throughput)
        shares.update(gpu_shares)
        if ratio is not None:
            imbalance[gpu_uuid] = ratio
    return [replace(s, load_share_ratio=shares.get(s.name)) for s in states], imbalance
