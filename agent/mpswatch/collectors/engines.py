"""Engines collector: vLLM engines on the node, their load, MPS attachment and CPU stalls.

Pure parts first (vLLM /metrics text, vLLM command lines, /proc CPU figures, load balance);
then the shell that finds engines, scrapes them concurrently with a deadline and a body cap,
and reads their processes' CPU time. GPU processes and MPS clients come from the other
collectors' latest snapshot, injected as `peers`.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor, wait
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


def parse_vllm_metrics(text: str) -> VllmSample:
    """Sums over vLLM's label sets (several engines or models behind one server). Knows the
    current names and the older `vllm:gpu_cache_usage_perc`; refuses text with no vLLM metric."""
    sums: dict[str, float] = {}
    model = gpu_memory_utilization = None
    found = False
    try:
        for family in text_string_to_metric_families(text):
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
    except Exception as err:  # the parser raises several kinds on malformed text
        raise BadMetrics(f"not Prometheus text: {err}"[:200]) from None
    if not found:
        raise BadMetrics("no vllm: metric in the body")
    kv = sums.get("vllm:kv_cache_usage_perc", sums.get("vllm:gpu_cache_usage_perc"))
    return VllmSample(
        model=model,
        requests_running=sums.get("vllm:num_requests_running"),
        requests_waiting=sums.get("vllm:num_requests_waiting"),
        prompt_tokens_total=sums.get("vllm:prompt_tokens_total"),
        generation_tokens_total=sums.get("vllm:generation_tokens_total"),
        kv_cache_usage_ratio=kv,
        gpu_memory_utilization=gpu_memory_utilization,
    )


def tokens_per_second(previous: tuple[float, float] | None, current: tuple[float, float] | None) -> float | None:
    """(time, prompt+generation tokens) pairs; a counter that went back (engine restart) counts
    from zero."""
    if previous is None or current is None or current[0] <= previous[0]:
        return None
    delta = current[1] - previous[1]
    if delta < 0:
        delta = current[1]
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
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
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
                rest = argv[i + 2 :]
                model = rest[0] if rest and not rest[0].startswith("-") else _option(argv, "--model")
                break
        else:
            return None
    port_text = _option(argv, "--port")
    try:
        port = int(port_text) if port_text else VLLM_DEFAULT_PORT
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


def stat_ppid(text: str) -> int | None:
    fields = stat_fields(text)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def stat_cpu_ticks(text: str) -> int | None:
    """utime + stime (fields 14 and 15 of stat)."""
    fields = stat_fields(text)
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

    def update(self, values: Mapping[Any, int]) -> int:
        for key, value in values.items():
            before = self.last.get(key)
            self.total += value if before is None else max(0, value - before)
        self.last = dict(values)
        return self.total


# ---------------------------------------------------------------- collector


@dataclass
class _Engine:
    name: str
    url: str
    found_by: str
    gpu_uuid: str | None = None
    root_pid: int | None = None
    scrape: Future | None = None
    previous_tokens: tuple[float, float] | None = None
    cpu: _Accumulator = field(default_factory=_Accumulator)
    wait: _Accumulator = field(default_factory=_Accumulator)
    thread_ticks: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)


class EnginesCollector:
    name = "engines"

    def __init__(
        self,
        *,
        configured: Iterable[Mapping[str, str]] = (),
        discover: bool = True,
        interval_seconds: float = 2.0,
        timeout_seconds: float = 2.0,
        max_body_bytes: int = 16 << 20,
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
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="engine-scrape")
        self._log = structlog.get_logger().bind(collector=self.name)
        self._down: dict[str, str] = {}

    # -- the cycle

    def collect(self) -> EnginesData:
        processes = self._process_table()
        self._find_engines(processes)
        self._start_scrapes()
        started = time.monotonic()
        pending = [e.scrape for e in self._engines.values() if e.scrape is not None]
        wait(pending, timeout=self._timeout + 0.2)
        peers = self._peers()
        gpu_kinds = _gpu_processes(peers)
        mps_clients = _mps_client_pids(peers)
        served_pipe_dirs = _served_pipe_dirs(peers)
        now = time.time()
        states = []
        for engine in sorted(self._engines.values(), key=lambda e: e.name):
            state = self._scraped(engine, now, time.monotonic() - started)
            state = self._with_processes(engine, state, processes, gpu_kinds, mps_clients, served_pipe_dirs, now)
            states.append(state)
        states, imbalance = _balanced(states)
        pressure = parse_pressure(self._procfs.read_text("pressure/cpu") or "")
        return EnginesData(engines=tuple(states), imbalance=frozen_map(imbalance), cpu_pressure=frozen_map(pressure))

    def _process_table(self) -> dict[int, tuple[int | None, list[str]]]:
        table = {}
        for pid in self._procfs.pids():
            stat = self._procfs.read_text(f"{pid}/stat")
            argv = self._procfs.cmdline(pid)
            if stat is not None and argv is not None:
                table[pid] = (stat_ppid(stat), argv)
        return table

    def _find_engines(self, processes: Mapping[int, tuple[int | None, list[str]]]) -> None:
        by_port: dict[int, tuple[int, VllmCommand]] = {}
        for pid, (_, argv) in processes.items():
            command = parse_vllm_command(argv)
            if command is not None:
                by_port.setdefault(command.port, (pid, command))
        for engine in self._engines.values():
            if engine.found_by == "configured":
                port = urlsplit(engine.url).port or VLLM_DEFAULT_PORT
                engine.root_pid = by_port[port][0] if port in by_port else None
        if not self._discover:
            return
        known_urls = {e.url for e in self._engines.values()}
        for pid, command in by_port.values():
            if command.metrics_url in known_urls:
                continue
            name = command.name
            if name not in self._engines:
                self._log.info("engine_discovered", engine=name, url=command.metrics_url, pid=pid)
                self._engines[name] = _Engine(name, command.metrics_url, "discovered")
            self._engines[name].root_pid = pid
        for name, engine in list(self._engines.items()):
            if engine.found_by == "discovered" and (engine.root_pid not in processes):
                self._log.info("engine_gone", engine=name)
                del self._engines[name]

    def _start_scrapes(self) -> None:
        for engine in self._engines.values():
            if engine.scrape is None or engine.scrape.done():
                engine.scrape = self._pool.submit(self._fetch, engine.url, self._timeout, self._max_body)

    def _scraped(self, engine: _Engine, now: float, waited: float) -> EngineState:
        base = EngineState(name=engine.name, url=engine.url, found_by=engine.found_by, up=False,
                           gpu_uuid=engine.gpu_uuid)
        scrape = engine.scrape
        if scrape is None or not scrape.done():
            return self._down_state(base, f"no answer within {self._timeout:g} s")
        try:
            sample = parse_vllm_metrics(scrape.result().decode("utf-8", "replace"))
        except Exception as err:  # down, refused, HTTP error, too big, garbage: this engine only
            return self._down_state(base, str(err)[:200] or type(err).__name__)
        if self._down.pop(engine.name, None) is not None:
            self._log.info("engine_up", engine=engine.name)
        tokens = None
        if sample.prompt_tokens_total is not None or sample.generation_tokens_total is not None:
            tokens = (now, (sample.prompt_tokens_total or 0.0) + (sample.generation_tokens_total or 0.0))
        tps = tokens_per_second(engine.previous_tokens, tokens)
        engine.previous_tokens = tokens
        return replace(
            base,
            up=True,
            model=sample.model,
            requests_running=sample.requests_running,
            requests_waiting=sample.requests_waiting,
            prompt_tokens_total=sample.prompt_tokens_total,
            generation_tokens_total=sample.generation_tokens_total,
            tokens_per_second=tps,
            kv_cache_usage_ratio=sample.kv_cache_usage_ratio,
            gpu_memory_utilization=sample.gpu_memory_utilization,
        )

    def _down_state(self, base: EngineState, reason: str) -> EngineState:
        if self._down.get(base.name) != reason:
            self._log.warning("engine_down", engine=base.name, url=base.url, reason=reason)
        self._down[base.name] = reason
        return replace(base, error=reason)

    def _with_processes(self, engine, state, processes, gpu_kinds, mps_clients, served_pipe_dirs, now):
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
        gpu_uuid = state.gpu_uuid or next((gpu_kinds[pid][0] for pid in on_gpu), None)
        if gpu_uuid is None:
            gpu_uuid = next((mps_clients[pid] for pid in pids if pid in mps_clients), None)
        cpu = self._cpu(engine, pids, now)
        busy = cpu.get("busiest")
        load = (state.requests_running or 0) + (state.requests_waiting or 0) if state.up else None
        env = self._environ(engine.root_pid)
        pipe_dir = (env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR) if env is not None else None
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

    def _cpu(self, engine: _Engine, pids: list[int], now: float) -> dict[str, float]:
        """CPU seconds and run-queue wait over all threads, and the busiest thread's share of a
        core since the last cycle. At most MAX_THREADS_PER_ENGINE threads are read."""
        process_ticks: dict[int, int] = {}
        wait_ns: dict[tuple[int, int], int] = {}
        thread_ticks: dict[tuple[int, int], tuple[float, int]] = {}
        busiest = None
        budget = MAX_THREADS_PER_ENGINE
        for pid in pids:
            ticks = stat_cpu_ticks(self._procfs.read_text(f"{pid}/stat") or "")
            if ticks is not None:
                process_ticks[pid] = ticks
            for tid in self._procfs.tasks(pid)[:budget]:
                budget -= 1
                tick = stat_cpu_ticks(self._procfs.read_text(f"{pid}/task/{tid}/stat") or "")
                if tick is not None:
                    thread_ticks[(pid, tid)] = (now, tick)
                    before = engine.thread_ticks.get((pid, tid))
                    if before is not None and now > before[0]:
                        ratio = (tick - before[1]) / CLOCK_TICKS / (now - before[0])
                        busiest = ratio if busiest is None else max(busiest, ratio)
                waited = schedstat_wait_ns(self._procfs.read_text(f"{pid}/task/{tid}/schedstat") or "")
                if waited is not None:
                    wait_ns[(pid, tid)] = waited
            if budget <= 0:
                break
        engine.thread_ticks = thread_ticks
        out: dict[str, float] = {}
        if process_ticks:
            out["cpu_seconds"] = engine.cpu.update(process_ticks) / CLOCK_TICKS
        if wait_ns:
            out["wait_seconds"] = engine.wait.update(wait_ns) / 1e9
        if busiest is not None:
            out["busiest"] = max(0.0, busiest)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def fetch_metrics(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(max_bytes + 1)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        raise
    if len(body) > max_bytes:
        raise BadMetrics(f"body larger than {max_bytes} bytes")
    return body


def _descendants(root: int, processes: Mapping[int, tuple[int | None, list[str]]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
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

