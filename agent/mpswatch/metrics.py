"""Every metric the agent exports, declared once; docs/metrics.md lists the same set (tested)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # gauge | counter
    labels: tuple[str, ...]
    help: str


_SPECS = [
    MetricSpec("mps_exporter_build_info", "gauge", ("version",), "Always 1; the agent's version."),
    MetricSpec("mps_exporter_collector_success", "gauge", ("collector",), "1 if the collector's last run succeeded."),
    MetricSpec("mps_exporter_collector_duration_seconds", "gauge", ("collector",), "Duration of the collector's last run."),
    MetricSpec(
        "mps_exporter_collector_last_success_timestamp_seconds",
        "gauge",
        ("collector",),
        "Unix time of the collector's last successful run.",
    ),
    MetricSpec("mps_exporter_collector_errors_total", "counter", ("collector", "reason"), "Failed collector runs by reason."),
    MetricSpec(
        "mps_exporter_collector_stale_after_seconds",
        "gauge",
        ("collector",),
        "Age of the last successful run past which the collector's data counts as stale (its loop stuck or gone).",
    ),
    MetricSpec(
        "mps_exporter_log_lines_dropped_total",
        "counter",
        ("reason",),
        "Log lines the agent could not write (write_failed) or dropped with its writer too far behind (backlog_full).",
    ),
    MetricSpec("mps_control_daemons", "gauge", (), "MPS control daemons watched on the node (found or configured); 0: none."),
    MetricSpec(
        "mps_control_expected",
        "gauge",
        ("reason",),
        "1 if the node's GPUs are meant to be shared through MPS, else 0; reason: configured, engine_pipe_dir, "
        "no_engine_pipe_dir. Absent when unknown.",
    ),
    MetricSpec("mps_control_up", "gauge", ("pipe_dir",), "1 if the MPS control daemon answered the last query."),
    MetricSpec(
        "mps_control_state",
        "gauge",
        ("pipe_dir", "state"),
        "State set: 1 for the daemon's current state (up, not_running, stale_pid_file, timeout, exec_failed, "
        "garbage_output, no_pipe_dir), 0 for the others.",
    ),
    MetricSpec("mps_control_info", "gauge", ("pipe_dir", "pid"), "Always 1; the control daemon's PID from its pid file."),
    MetricSpec(
        "mps_control_resource_info",
        "gauge",
        ("pipe_dir", "resource"),
        "Always 1 for a daemon of the Kubernetes device plugin: the resource (nvidia.com/gpu) whose pipe dir it serves.",
    ),
    MetricSpec(
        "mps_control_command_duration_seconds",
        "gauge",
        ("pipe_dir", "command"),
        "Round trip of the last control command of this kind.",
    ),
    MetricSpec(
        "mps_control_command_failures_total",
        "counter",
        ("pipe_dir", "command", "reason"),
        "Failed control commands by reason (timeout, not_running, error_reply, exec_failed, garbage_output).",
    ),
    MetricSpec(
        "mps_control_commands_starved_total",
        "counter",
        ("pipe_dir",),
        "Control commands given their deadline once more because the control program was runnable but starved "
        "of CPU at the deadline (a busy node, not a hung daemon).",
    ),
    MetricSpec(
        "mps_control_probe_timestamp_seconds",
        "gauge",
        ("pipe_dir",),
        "Unix time the daemon's exported series were measured; older than a cycle when its probe was deferred.",
    ),
    MetricSpec(
        "mps_control_program_cpu_seconds_total",
        "counter",
        (),
        "User and system CPU of the control-program runs the agent started and reaped (its only child processes), "
        "since it started: add it to the agent's own process CPU for its whole cost.",
    ),
    MetricSpec(
        "mps_control_poll_mode",
        "gauge",
        ("pipe_dir", "mode"),
        "1 for how the daemon is asked: on_change (when its logs, processes or GPU clients show a change, a "
        "liveness query and a heartbeat) or every_cycle (its logs cannot be read, no daemon process whose children /proc "
        "lists, or mps_control.heartbeat_seconds is 0).",
    ),
    MetricSpec(
        "mps_control_probes_deferred",
        "gauge",
        (),
        "Watched daemons whose probe did not complete within this cycle's budget: their series are from an earlier "
        "cycle (or absent, never probed yet).",
    ),
    MetricSpec(
        "mps_servers_lost_total",
        "counter",
        ("pipe_dir",),
        "MPS servers that vanished from the daemon's list while clients were connected to them (killed or crashed).",
    ),
    MetricSpec(
        "mps_orphaned_servers",
        "gauge",
        ("pipe_dir",),
        "MPS servers still running for this pipe dir while its control daemon is not (killed daemon).",
    ),
    MetricSpec("mps_server_info", "gauge", ("pipe_dir", "server_pid", "uid"), "Always 1 per MPS server."),
    MetricSpec(
        "mps_server_status",
        "gauge",
        ("pipe_dir", "uid", "status"),
        "State set: 1 for the server's current status (INITIALIZING, ACTIVE, FAULT), 0 for the others.",
    ),
    MetricSpec(
        "mps_server_active_thread_ratio",
        "gauge",
        ("pipe_dir", "uid"),
        "Share of the GPU's threads the server's clients may use (0-1; MPS's active thread percentage / 100).",
    ),
    MetricSpec("mps_server_clients", "gauge", ("pipe_dir", "uid"), "Clients connected to the server, all devices."),
    MetricSpec(
        "mps_server_started_before_limits",
        "gauge",
        ("pipe_dir", "uid"),
        "1 if the control log shows the server started before the daemon's default limits were last set (it runs "
        "with the defaults of before, and so do its clients), else 0; absent when its start is not in a watched log.",
    ),
    MetricSpec(
        "mps_default_active_thread_ratio",
        "gauge",
        ("pipe_dir",),
        "Default share of the GPU's threads for new servers (0-1; MPS's percentage / 100).",
    ),
    MetricSpec(
        "mps_default_device_pinned_memory_limit_bytes",
        "gauge",
        ("pipe_dir",),
        "Default pinned device memory limit for device 0; absent when unset.",
    ),
    MetricSpec(
        "mps_clients",
        "gauge",
        ("pipe_dir", "uid", "gpu_uuid"),
        "Connected clients per server and device (full GPU UUID where the driver's /proc files name it).",
    ),
    MetricSpec("mps_client_limit", "gauge", ("pipe_dir",), "Clients allowed per device (48 on Volta and later)."),
    MetricSpec(
        "mps_client_info",
        "gauge",
        ("pipe_dir", "server_pid", "pid", "gpu_uuid", "command", "engine"),
        "Always 1 per connected client.",
    ),
    MetricSpec(
        "mps_fault_blamed_client_info",
        "gauge",
        ("pipe_dir", "server_pid", "log_dir", "pid"),
        "Always 1 per server in FAULT, or faulted or died in the last 15 minutes, whose MPS log blames a client "
        "for a fatal GPU error: pid is the client MPS names (it can name an innocent one).",
    ),
]

_SPECS += [
    MetricSpec(
        "mps_log_events_total",
        "counter",
        ("log_dir", "source", "event"),
        "Events read from the MPS logs by source (control, server); every known event starts at 0.",
    ),
    MetricSpec(
        "mps_log_last_event_timestamp_seconds",
        "gauge",
        ("log_dir", "event"),
        "Unix time written in the log line of the latest event of this kind.",
    ),
    MetricSpec("mps_log_lines_total", "counter", ("log_dir", "source"), "Complete lines read from the log."),
    MetricSpec(
        "mps_log_read_errors_total",
        "counter",
        ("log_dir", "source", "reason"),
        "Lines skipped or kept with bad bytes, reads failed, rotated files lost, by reason (see docs/metrics.md).",
    ),
    MetricSpec(
        "mps_log_file_resets_total",
        "counter",
        ("log_dir", "source", "reason"),
        "The log file was rotated (renamed; one per file that held its name), truncated or deleted, and followed.",
    ),
]

_GPU = ("gpu_uuid",)
_SPECS += [
    MetricSpec("mps_gpu_info", "gauge", ("gpu", "gpu_uuid", "name", "driver_version", "compute_mode"), "Always 1 per GPU."),
    MetricSpec(
        "mps_gpus_without_uuid",
        "gauge",
        (),
        "GPUs NVML lists whose UUID it has not given: they have no per-GPU series (a GPU is named by its UUID).",
    ),
    MetricSpec("mps_gpu_up", "gauge", _GPU, "1 if NVML answered for this GPU this cycle, 0 if its calls failed (e.g. GPU lost)."),
    MetricSpec("mps_gpu_gpm_supported", "gauge", _GPU, "1 if the GPU has GPM (Hopper and later), else 0."),
    MetricSpec("mps_gpu_sm_active_ratio", "gauge", _GPU, "GPM SM activity over the last interval."),
    MetricSpec("mps_gpu_sm_occupancy_ratio", "gauge", _GPU, "GPM SM occupancy over the last interval."),
    MetricSpec("mps_gpu_dram_bandwidth_ratio", "gauge", _GPU, "GPM DRAM bandwidth utilisation over the last interval."),
    MetricSpec("mps_gpu_tensor_active_ratio", "gauge", _GPU, "GPM any-tensor activity over the last interval."),
    MetricSpec("mps_gpu_utilization_ratio", "gauge", _GPU, "NVML coarse utilisation: time a kernel ran."),
    MetricSpec("mps_gpu_memory_used_bytes", "gauge", _GPU, "GPU memory in use."),
    MetricSpec("mps_gpu_memory_total_bytes", "gauge", _GPU, "GPU memory in all."),
    MetricSpec("mps_gpu_power_watts", "gauge", _GPU, "Power draw."),
    MetricSpec("mps_gpu_temperature_celsius", "gauge", _GPU, "GPU temperature."),
    MetricSpec(
        "mps_gpu_memory_by_kind_bytes",
        "gauge",
        ("gpu_uuid", "kind"),
        "GPU memory of the GPU's processes of a kind: mps_client, mps_server or exclusive (a compute process not "
        "under MPS).",
    ),
    MetricSpec(
        "mps_engine_gpu_memory_bytes",
        "gauge",
        ("engine", "gpu_uuid"),
        "GPU memory of the engine's processes on this GPU.",
    ),
    MetricSpec("mps_gpu_xid_errors_total", "counter", ("gpu_uuid", "xid"), "XID errors reported by NVML events."),
]

_ENGINE = ("engine",)
_SPECS += [
    MetricSpec("mps_engine_info", "gauge", ("engine", "model", "url", "gpu_uuid", "kind"), "Always 1 per engine."),
    MetricSpec("mps_engine_up", "gauge", _ENGINE, "1 if the engine's metrics endpoint answered with its kind's metrics."),
    MetricSpec(
        "mps_engine_scrape_rejected_samples_total",
        "counter",
        ("engine", "reason"),
        "Samples of the engine's answers refused (their figure left unknown); reason: not_finite, negative, "
        "duplicate_series.",
    ),
    MetricSpec(
        "mps_engine_mps_attached",
        "gauge",
        _ENGINE,
        "1 if the engine's GPU process is an MPS client, 0 if it runs on the GPU without MPS; absent when unknown.",
    ),
    MetricSpec("mps_engine_requests_running", "gauge", _ENGINE, "Requests in the engine's running batch."),
    MetricSpec("mps_engine_requests_waiting", "gauge", _ENGINE, "Requests waiting for the engine."),
    MetricSpec("mps_engine_prompt_tokens_total", "counter", _ENGINE, "Prompt tokens processed (the engine's own total)."),
    MetricSpec("mps_engine_generation_tokens_total", "counter", _ENGINE, "Tokens generated (the engine's own total)."),
    MetricSpec("mps_engine_preemptions_total", "counter", _ENGINE, "Requests the engine preempted (vLLM)."),
    MetricSpec("mps_engine_tokens_per_second", "gauge", _ENGINE, "Prompt + generation tokens per second, last interval."),
    MetricSpec("mps_engine_kv_cache_usage_ratio", "gauge", _ENGINE, "KV-cache usage, 0 to 1."),
    MetricSpec("mps_engine_prompt_tokens_per_request", "gauge", _ENGINE,
               "Mean prompt length of the engine's finished requests (vLLM's request_prompt_tokens histogram)."),
    MetricSpec("mps_engine_generation_tokens_per_request", "gauge", _ENGINE,
               "Mean generated length of the engine's finished requests (vLLM's request_generation_tokens)."),
    MetricSpec("mps_engine_latency_p50_seconds", "gauge", ("engine", "latency"),
               "Median of the engine's latency over the latency window, from its own histograms (histogram_quantile)."),
    MetricSpec("mps_engine_latency_p99_seconds", "gauge", ("engine", "latency"),
               "99th percentile of the engine's latency over the latency window, from its own histograms."),
    MetricSpec("mps_engine_latency_mean_seconds", "gauge", ("engine", "latency"),
               "Mean of the engine's latency over the latency window (histogram sum over count)."),
    MetricSpec("mps_engine_latency_window_seconds", "gauge", _ENGINE,
               "Time the engine's latency figures cover: between the oldest and newest scrape kept in the window."),
    MetricSpec("mps_engine_inter_token_latency_baseline_seconds", "gauge", _ENGINE,
               "The engine's usual inter-token latency: median of its 10 s means while its GPU was quiet, last 10 min."),
    MetricSpec("mps_engine_inter_token_latency_slowdown_ratio", "gauge", _ENGINE,
               "The engine's inter-token latency over the last 10 s against its baseline (1 = as usual)."),
    MetricSpec("mps_engine_burst", "gauge", _ENGINE,
               "1 while the engine's prompt-token rate or running requests burst above its usual (last 10 min), else 0."),
    MetricSpec("mps_engine_interference_slowdown_ratio", "gauge", ("engine", "neighbour"),
               "Present while the engine is slowed (slowdown >= 1.25) and `neighbour` on its GPU bursts: the slowdown."),
    MetricSpec("mps_engine_model_parameters", "gauge", _ENGINE,
               "Parameter count stated by the served model's name or path (e.g. Qwen2.5-1.5B: 1.5e9); absent when none."),
    MetricSpec(
        "mps_gpu_mps_gain_estimate_ratio",
        "gauge",
        ("gpu_uuid",),
        "Estimated throughput of two engines under MPS over one alone, minus 1, for this GPU's workload (mpswatch advise).",
    ),
    MetricSpec(
        "mps_gpu_mps_verdict",
        "gauge",
        ("gpu_uuid", "verdict"),
        "State set over pays_off, marginal, likely_slower: whether MPS pays off on this GPU (mpswatch advise).",
    ),
    MetricSpec(
        "mps_gpu_timesliced_gain_estimate_ratio",
        "gauge",
        ("gpu_uuid",),
        "Estimated throughput of two engines time-sliced (no MPS) over one alone, minus 1, for this GPU's workload.",
    ),
    MetricSpec(
        "mps_gpu_best_sharing_mode",
        "gauge",
        ("gpu_uuid", "mode"),
        "State set over none, time_sliced, mps, mps_thread_split: the best way to share this GPU for throughput (advise).",
    ),
    MetricSpec(
        "mps_engine_load_share_ratio",
        "gauge",
        ("engine", "gpu_uuid"),
        "The engine's share of its GPU's token throughput over the last interval.",
    ),
    MetricSpec(
        "mps_gpu_engine_imbalance_ratio",
        "gauge",
        ("gpu_uuid",),
        "Busiest engine's share over the fair share on this GPU (1 = balanced; the engine count = all load on one).",
    ),
    MetricSpec("mps_engine_cpu_seconds_total", "counter", _ENGINE, "CPU time of all the engine's processes."),
    MetricSpec(
        "mps_engine_busiest_thread_cpu_ratio",
        "gauge",
        _ENGINE,
        "Share of one core used by the engine's busiest thread over the last interval (a saturated Python loop: ~1).",
    ),
    MetricSpec(
        "mps_engine_runqueue_wait_seconds_total",
        "counter",
        _ENGINE,
        "Time the engine's threads waited for a CPU (schedstat).",
    ),
    MetricSpec(
        "mps_engine_cpu_bound",
        "gauge",
        _ENGINE,
        "1 when the busiest thread uses 0.9 of a core or more while requests run or wait; else 0.",
    ),
    MetricSpec(
        "mps_engine_gpu_memory_utilization_ratio",
        "gauge",
        ("engine", "gpu_uuid"),
        "vLLM's gpu_memory_utilization setting (share of the GPU's memory it takes).",
    ),
    MetricSpec(
        "mps_engine_mps_settings_info",
        "gauge",
        ("engine", "pipe_dir", "active_thread_percentage", "pinned_device_mem_limit"),
        "Always 1; the MPS client settings in the engine's environment (empty: unset).",
    ),
    MetricSpec(
        "mps_engine_active_thread_ratio",
        "gauge",
        ("engine", "source"),
        "Share of the GPU's threads the engine's MPS client may use (0-1): its server's, or lower from its "
        "environment; source: server, client_env. Absent when unknown or the engine is not an MPS client.",
    ),
    MetricSpec(
        "mps_engine_pinned_device_memory_limit_bytes",
        "gauge",
        ("engine", "source"),
        "Pinned device memory the engine's MPS client may allocate on its GPU; source: daemon_default, client_env. "
        "Absent when no limit is set or it is unknown (mpswatch status says which).",
    ),
    MetricSpec(
        "mps_engine_pipe_dir_served",
        "gauge",
        _ENGINE,
        "1 if the watched control daemon of the engine's CUDA_MPS_PIPE_DIRECTORY answers, 0 if it is not running; "
        "absent when unknown (not watched, or the daemon cannot be queried).",
    ),
    MetricSpec("mps_host_cpu_pressure_ratio", "gauge", ("window",), "PSI cpu 'some' average over avg10 / avg60."),
    MetricSpec(
        "mps_engine_owner_info",
        "gauge",
        ("engine", "uid"),
        "Always 1 per engine with a process: the user its API server runs as (root or not: who may have named it).",
    ),
    MetricSpec(
        "mps_discovery_unreadable_processes",
        "gauge",
        ("kind", "reason"),
        "Processes found by name (kind: mps_control_daemon, engine) whose environment the agent could not read, "
        "by reason (permission, io_error): what it cannot see. Absent when it looks at none (configured only).",
    ),
]

_POD = ("pod_uid", "namespace", "pod", "container")
_SPECS += [
    MetricSpec(
        "mps_pod_info",
        "gauge",
        ("pid", *_POD),
        "Always 1 per MPS client or GPU process in a Kubernetes pod; namespace, pod, container empty when unknown.",
    ),
    MetricSpec(
        "mps_engine_pod_info",
        "gauge",
        ("engine", *_POD),
        "Always 1 per engine whose API server runs in a Kubernetes pod; namespace, pod, container empty when unknown.",
    ),
    MetricSpec("mps_pod_resources_up", "gauge", (), "1 if the kubelet's PodResources List answered; absent without its socket."),
    MetricSpec(
        "mps_pod_resources_failures_total",
        "counter",
        ("reason",),
        "Failed PodResources List calls by gRPC status (unavailable, deadline_exceeded, permission_denied, ...).",
    ),
]

# the agent's own process, named as prometheus_client's ProcessCollector (and node_exporter) name them
_SPECS += [
    MetricSpec("process_cpu_seconds_total", "counter", (), "User and system CPU time of the agent's process."),
    MetricSpec("process_resident_memory_bytes", "gauge", (), "Resident memory of the agent's process."),
    MetricSpec("process_virtual_memory_bytes", "gauge", (), "Virtual memory of the agent's process."),
    MetricSpec("process_open_fds", "gauge", (), "Open file descriptors of the agent's process."),
    MetricSpec("process_max_fds", "gauge", (), "Open file descriptors the agent's process may have (its limit)."),
    MetricSpec("process_start_time_seconds", "gauge", (), "Unix time the agent's process started."),
]

CATALOG: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


class Families:
    """The families of one rendering, built from the catalog, so nothing undeclared can be exported;
    families come out in the order they were first added to."""

    def __init__(self) -> None:
        self._families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, name: str, labels: Iterable[object], value: float) -> None:
        family = self._families.get(name)
        if family is None:
            spec = CATALOG[name]
            kind = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
            family = self._families[name] = kind(name, spec.help, labels=spec.labels)
        family.add_metric([label_text(label) for label in labels], value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def label_text(value: object) -> str:
    """`value` as a label value the exposition can always encode as UTF-8: a byte that did not decode
    (a surrogate from os.fsdecode, as in a directory name) is spelt `\\xfe`, any other lone surrogate
    `\\udcfe`; without this one such label made every scrape fail."""
    text = str(value)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
