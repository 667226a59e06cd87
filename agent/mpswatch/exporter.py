"""Renders the latest snapshot for Prometheus and serves /metrics and /healthz.

A scrape only reads the current immutable snapshot: no I/O, no locks held by collectors.
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mpswatch.advisor import VERDICTS, Advice, advise_node
from mpswatch.metrics import CATALOG
from mpswatch.snapshot import (
    SERVER_STATUSES,
    DaemonState,
    EnginesData,
    GpuData,
    MpsControlData,
    MpsLogsData,
    NodeSnapshot,
)


class _Families:
    """Builds families from the catalog, so nothing undeclared can be exported."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, name: str, labels: Iterable[object], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            spec = CATALOG[name]
            if spec.type == "counter":
                family = CounterMetricFamily(name, spec.help, labels=spec.labels)
            else:
                family = GaugeMetricFamily(name, spec.help, labels=spec.labels)
            self._families[name] = family
        family.add_metric([str(label) for label in labels], value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def render(snapshot: NodeSnapshot, version: str) -> list[Metric]:
    out = _Families()
    engines = snapshot.data("engines")
    engines = engines if isinstance(engines, EnginesData) else None
    engine_of = {pid: e.name for e in engines.engines for pid in e.pids} if engines else {}
    out.add("mpswatch_build_info", [version], 1)
    for name, report in sorted(snapshot.reports.items()):
        status = report.status
        out.add("mpswatch_collector_success", [name], 1 if status.success else 0)
        if status.duration_seconds is not None:
            out.add("mpswatch_collector_duration_seconds", [name], status.duration_seconds)
        if status.last_success_time is not None:
            out.add("mpswatch_collector_last_success_timestamp_seconds", [name], status.last_success_time)
        for reason, count in sorted(status.errors_total.items()):
            out.add("mpswatch_collector_errors_total", [name, reason], count)
    control = snapshot.data("mps_control")
    if isinstance(control, MpsControlData):
        _render_mps_control(control, out, engine_of)
    logs = snapshot.data("mps_logs")
    if isinstance(logs, MpsLogsData):
        _render_mps_logs(logs, out)
    gpus = snapshot.data("gpu")
    if isinstance(gpus, GpuData):
        _render_gpus(gpus, out, engine_of)
    if engines is not None:
        _render_engines(engines, out)
    if engines is not None and isinstance(gpus, GpuData):
        _render_advice(advise_node(gpus.gpus, engines.engines, dict(engines.imbalance)), out)
    return list(out)


def _render_advice(advice: list[Advice], out: _Families) -> None:
    for a in advice:
        if a.gain_estimate is None:
            continue
        out.add("mps_gpu_mps_gain_estimate_ratio", [a.gpu_uuid], a.gain_estimate)
        for verdict in VERDICTS:
            out.add("mps_gpu_mps_verdict", [a.gpu_uuid, verdict], 1 if a.verdict == verdict else 0)


def _render_engines(data: EnginesData, out: _Families) -> None:
    values = {
        "mps_engine_requests_running": "requests_running",
        "mps_engine_requests_waiting": "requests_waiting",
        "mps_engine_prompt_tokens_total": "prompt_tokens_total",
        "mps_engine_generation_tokens_total": "generation_tokens_total",
        "mps_engine_tokens_per_second": "tokens_per_second",
        "mps_engine_kv_cache_usage_ratio": "kv_cache_usage_ratio",
        "mps_engine_cpu_seconds_total": "cpu_seconds_total",
        "mps_engine_busiest_thread_cpu_ratio": "busiest_thread_cpu_ratio",
        "mps_engine_runqueue_wait_seconds_total": "runqueue_wait_seconds_total",
        "mps_engine_prompt_tokens_per_request": "prompt_tokens_per_request",
        "mps_engine_generation_tokens_per_request": "generation_tokens_per_request",
        "mps_engine_model_parameters": "model_parameters",
    }
    for e in data.engines:
        out.add("mps_engine_info", [e.name, e.model or "", e.url, e.gpu_uuid or ""], 1)
        out.add("mps_engine_up", [e.name], 1 if e.up else 0)
        for metric, attribute in values.items():
            value = getattr(e, attribute)
            if value is not None:
                out.add(metric, [e.name], value)
        for metric, flag in (("mps_engine_mps_attached", e.mps_attached), ("mps_engine_cpu_bound", e.cpu_bound),
                             ("mps_engine_pipe_dir_served", e.pipe_dir_served)):
            if flag is not None:
                out.add(metric, [e.name], 1 if flag else 0)
        if e.load_share_ratio is not None:
            out.add("mps_engine_load_share_ratio", [e.name, e.gpu_uuid or ""], e.load_share_ratio)
        if e.gpu_memory_utilization is not None:
            out.add("mps_engine_gpu_memory_utilization_ratio", [e.name, e.gpu_uuid or ""], e.gpu_memory_utilization)
        if e.mps_pipe_dir is not None:
            settings = [e.name, e.mps_pipe_dir, e.mps_active_thread_percentage or "", e.mps_pinned_device_mem_limit or ""]
            out.add("mps_engine_mps_settings_info", settings, 1)
    for gpu_uuid, ratio in sorted(data.imbalance.items()):
        out.add("mps_gpu_engine_imbalance_ratio", [gpu_uuid], ratio)
    for window, ratio in sorted(data.cpu_pressure.items()):
        out.add("mps_host_cpu_pressure_ratio", [window], ratio)


_GPU_VALUES = {
    "mps_gpu_sm_active_ratio": "sm_active_ratio",
    "mps_gpu_sm_occupancy_ratio": "sm_occupancy_ratio",
    "mps_gpu_dram_bandwidth_ratio": "dram_bandwidth_ratio",
    "mps_gpu_tensor_active_ratio": "tensor_active_ratio",
    "mps_gpu_utilization_ratio": "utilization_ratio",
    "mps_gpu_memory_used_bytes": "memory_used_bytes",
    "mps_gpu_memory_total_bytes": "memory_total_bytes",
    "mps_gpu_power_watts": "power_watts",
    "mps_gpu_temperature_celsius": "temperature_celsius",
}


def _render_gpus(data: GpuData, out: _Families, engine_of: dict[int, str]) -> None:
    for gpu in data.gpus:
        ids = [gpu.index, gpu.uuid or ""]
        out.add("mps_gpu_up", ids, 1 if gpu.up else 0)
        if gpu.uuid is not None:
            info = [*ids, gpu.name or "", data.driver_version or "", gpu.compute_mode or ""]
            out.add("mps_gpu_info", info, 1)
        for xid, count in sorted(gpu.xid_counts.items()):
            out.add("mps_gpu_xid_errors_total", [*ids, xid], count)
        if not gpu.up:
            continue
        if gpu.gpm_supported is not None:
            out.add("mps_gpu_gpm_supported", ids, 1 if gpu.gpm_supported else 0)
        for metric, attribute in _GPU_VALUES.items():
            value = getattr(gpu, attribute)
            if value is not None:
                out.add(metric, ids, value)
        for process in gpu.processes or ():
            if process.memory_bytes is not None:
                engine = engine_of.get(process.pid, "")
                out.add("mps_gpu_process_memory_bytes", [*ids, process.pid, process.kind, engine], process.memory_bytes)


def _render_mps_logs(data: MpsLogsData, out: _Families) -> None:
    for state in data.dirs:
        d = state.log_dir
        for (source, event), count in sorted(state.event_counts.items()):
            out.add("mps_log_events_total", [d, source, event], count)
        for event, when in sorted(state.last_event_time.items()):
            out.add("mps_log_last_event_timestamp_seconds", [d, event], when)
        for source, count in sorted(state.lines.items()):
            out.add("mps_log_lines_total", [d, source], count)
        for (source, reason), count in sorted(state.read_problems.items()):
            out.add("mps_log_read_errors_total", [d, source, reason], count)
        for (source, reason), count in sorted(state.file_resets.items()):
            out.add("mps_log_file_resets_total", [d, source, reason], count)


def _render_mps_control(data: MpsControlData, out: _Families, engine_of: dict[int, str]) -> None:
    for daemon in data.daemons:
        d = daemon.pipe_dir
        out.add("mps_control_up", [d], 1 if daemon.up else 0)
        for state in DaemonState:
            out.add("mps_control_state", [d, state.value], 1 if daemon.state is state else 0)
        if daemon.pid is not None:
            out.add("mps_control_info", [d, daemon.pid], 1)
        for command, seconds in sorted(daemon.command_durations.items()):
            out.add("mps_control_command_duration_seconds", [d, command], seconds)
        for (command, reason), count in sorted(daemon.command_failures.items()):
            out.add("mps_control_command_failures_total", [d, command, reason], count)
        out.add("mps_client_limit", [d], daemon.client_limit)
        out.add("mps_servers_lost_total", [d], daemon.servers_lost_total)
        if daemon.orphaned_server_pids is not None:
            out.add("mps_orphaned_servers", [d], len(daemon.orphaned_server_pids))
        if not daemon.up:
            continue
        if daemon.default_active_thread_percentage is not None:
            out.add("mps_default_active_thread_percentage", [d], daemon.default_active_thread_percentage)
        if daemon.default_pinned_memory_limit_bytes is not None:
            out.add("mps_default_device_pinned_memory_limit_bytes", [d], daemon.default_pinned_memory_limit_bytes)
        per_server: dict[int, int] = {}
        for client in daemon.clients or ():
            per_server[client.server_pid] = per_server.get(client.server_pid, 0) + 1
        for server in daemon.servers:
            out.add("mps_server_info", [d, server.pid, "" if server.uid is None else server.uid], 1)
            if server.status is not None:
                for status in SERVER_STATUSES:
                    out.add("mps_server_status", [d, server.pid, status], 1 if server.status == status else 0)
            if server.active_thread_percentage is not None:
                out.add("mps_server_active_thread_percentage", [d, server.pid], server.active_thread_percentage)
            if daemon.clients is not None:
                out.add("mps_server_clients", [d, server.pid], per_server.get(server.pid, 0))
        for (server_pid, device), count in sorted(daemon.clients_per_device().items()):
            out.add("mps_clients", [d, server_pid, device], count)
        for client in daemon.clients or ():
            engine = engine_of.get(client.pid, "")
            out.add("mps_client_info", [d, client.server_pid, client.pid, client.device, client.command, engine], 1)


class _Rendered:
    """A registry-shaped holder of already rendered families, for generate_latest()."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class CachedExposition:
    """The text exposition of the current snapshot, rendered once per snapshot: snapshots are
    immutable, so every scrape between two collector runs gets the same bytes for free, and
    concurrent scrapes wait for one rendering instead of each doing it."""

    def __init__(self, current: Callable[[], NodeSnapshot], version: str) -> None:
        self._current = current
        self._version = version
        self._lock = threading.Lock()
        self._snapshot: NodeSnapshot | None = None
        self._body = b""

    def body(self) -> bytes:
        snapshot = self._current()
        with self._lock:
            if snapshot is not self._snapshot:
                self._body = generate_latest(_Rendered(render(snapshot, self._version)))
                self._snapshot = snapshot
            return self._body


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


_INDEX = b"<html><body><h1>mpswatch</h1><p><a href='/metrics'>/metrics</a> <a href='/healthz'>/healthz</a></p></body></html>\n"


def respond(path: str, exposition: CachedExposition, healthy: Callable[[], tuple[bool, str]]) -> tuple[str, str, bytes]:
    """Status, content type and body for a GET of `path` (query string already cut off)."""
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, exposition.body()
    if path == "/healthz":
        ok, detail = healthy()
        return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", f"{'ok' if ok else 'unhealthy'}: {detail}\n".encode()
    if path == "/":
        return "200 OK", "text/html", _INDEX
    return "404 Not Found", "text/plain", b"not found\n"


class _Handler(BaseHTTPRequestHandler):
    """One request per connection, answered with a single write: status line, headers and body go
    out in one send (wsgiref makes five, each a loopback wake-up: a third of a scrape's CPU)."""

    timeout = 10  # each read of the request waits at most this long
    server_version = "mpswatch"
    sys_version = ""
    exposition: CachedExposition
    healthy: Callable[[], tuple[bool, str]]
    log: Any

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        self.close_connection = True
        try:
            status, content_type, body = respond(self.path.partition("?")[0], self.exposition, self.healthy)
        except Exception as err:  # a rendering bug costs this answer, never the server
            self.log.error("http_answer_failed", path=self.path[:200], error=repr(err))
            status, content_type, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        head = (f"HTTP/1.0 {status}\r\nServer: {self.server_version}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + body if with_body else head)
        except (ConnectionError, TimeoutError):
            pass  # the scraper gave up (its own timeout, a reset): no one is left to answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    log: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure is logged as one line, not printed as a traceback on stderr."""
        self.log.warning("http_connection_failed", client=str(client_address[0]), error=repr(sys.exc_info()[1]))


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(listen: str, exposition: CachedExposition, healthy: Callable[[], tuple[bool, str]]):
    """Starts the HTTP server on a daemon thread; returns the server (call shutdown() to stop)."""
    host, port = parse_listen(listen)
    log = structlog.get_logger().bind(component="http")
    handler = type("Handler", (_Handler,), {"exposition": exposition, "healthy": staticmethod(healthy), "log": log})
    httpd = (_Server6 if ":" in host else _Server)((host, port), handler)
    httpd.log = log
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd
