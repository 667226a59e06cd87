"""The immutable data model: what collectors produce and what scrapes and `status` render.

None means "not known" and renders as no series; it is never replaced by a zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpswatch.advisor import Advice
    from mpswatch.interference import Interference
    from mpswatch.latency import LatencyFigures


def frozen_map(items: Mapping[Any, Any] | None = None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(items or {}))


class DaemonState(str, Enum):  # noqa: UP042 - str() of a member must stay as it is
    """Why a control daemon is or is not answering; the values double as failure reasons."""

    UP = "up"
    NOT_RUNNING = "not_running"
    STALE_PID_FILE = "stale_pid_file"
    HUNG = "timeout"
    EXEC_FAILED = "exec_failed"
    GARBAGE = "garbage_output"
    NO_PIPE_DIR = "no_pipe_dir"


SERVER_STATUSES = ("INITIALIZING", "ACTIVE", "FAULT")


@dataclass(frozen=True)
class MpsClient:
    pid: int
    client_id: int | None
    server_pid: int
    device: str  # as `ps` prints it: a UUID cut to its first three groups
    namespace: str
    command: str


@dataclass(frozen=True)
class MpsServer:
    pid: int
    uid: int | None
    status: str | None
    active_thread_percentage: float | None


@dataclass(frozen=True)
class MpsDaemon:
    pipe_dir: str
    found_by: str
    state: DaemonState
    reason: str
    pid: int | None = None
    servers: tuple[MpsServer, ...] = ()
    clients: tuple[MpsClient, ...] | None = ()  # None: `ps` gave no usable answer
    default_active_thread_percentage: float | None = None
    default_pinned_memory_limit_bytes: int | None = None  # None: no limit, or not known (see the next field)
    default_pinned_memory_limit_known: bool = False  # the daemon answered get_default_device_pinned_mem_limit
    client_limit: int = 48
    # the Kubernetes device plugin's resource whose daemon this is (nvidia.com/gpu), from the pipe dir's
    # place under the plugin's root (<root>/<resource>/pipe); None: not under it
    resource: str | None = None
    # servers still running on this pipe dir while the daemon is down; None: unknown (not looked, or
    # /proc hides their environment)
    orphaned_server_pids: tuple[int, ...] | None = None
    servers_lost_total: int = 0  # servers that vanished while serving clients, since the agent started
    command_durations: Mapping[str, float] = field(default_factory=frozen_map)  # the last probe's, by command
    # (command, reason) -> count: since the agent started, as exported; a single probe's own in probe_daemon
    command_failures: Mapping[tuple[str, str], int] = field(default_factory=frozen_map)
    # commands not sent in the last probe: the daemon's share of the cycle was used up (a slow daemon)
    commands_not_asked: tuple[str, ...] = ()
    # commands whose deadline was given once more because the control program was starved of CPU, since
    # the agent started (a single probe's own in probe_daemon)
    commands_starved_total: int = 0
    measured_at: float | None = None  # unix time its probe ended
    # how the daemon is asked (mps_control.CHANGE_POLL_MODES): on_change (cheap signals, a liveness query and
    # a heartbeat) or every_cycle (its logs cannot be read, or configured so); None: not decided yet
    poll_mode: str | None = None

    @property
    def up(self) -> bool:
        return self.state is DaemonState.UP

    def clients_per_device(self) -> dict[tuple[int, str], int]:
        counts: dict[tuple[int, str], int] = {}
        for client in self.clients or ():
            key = (client.server_pid, client.device)
            counts[key] = counts.get(key, 0) + 1
        return counts


@dataclass(frozen=True)
class MpsControlData:
    daemons: tuple[MpsDaemon, ...]  # every watched daemon
    searched: tuple[str, ...]
    discovery_notes: tuple[str, ...] = ()
    configured_only: bool = False  # only the configured pipe dirs are watched (no discovery)
    expected: str = "auto"  # the mps_control.expected setting: true, false or auto (derived: MpsExpectation)
    # daemons whose environment (their pipe dir) could not be read, by reason; None: none looked for
    unreadable_daemons: Mapping[str, int] | None = None
    # pipe dirs of the watched daemons whose probe did not end within the cycle's budget (their entry
    # in `daemons` is an earlier cycle's), and of those never probed yet (no entry; among the deferred)
    deferred: tuple[str, ...] = ()
    not_yet_probed: tuple[str, ...] = ()
    # user + system CPU of the control-program runs the agent started and reaped (its only children), since
    # it started: what its own CPU figure leaves out (issue 19); None: not measured (one look)
    control_program_cpu_seconds: float | None = None


@dataclass(frozen=True)
class LogEvent:
    event: str
    time: float  # unix time written in the log line
    source: str  # control | server
    pid: int  # the process that wrote the line
    message: str
    server_pid: int | None = None
    client_pid: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class LogDirState:
    log_dir: str
    found_by: str
    sources_present: tuple[str, ...]
    event_counts: Mapping[tuple[str, str], int]  # (source, event) -> count, 0 for known events
    last_event_time: Mapping[str, float]
    read_problems: Mapping[tuple[str, str], int]  # (source, reason)
    file_resets: Mapping[tuple[str, str], int]  # (source, rotated | truncated | deleted)
    lines: Mapping[str, int]


@dataclass(frozen=True)
class ServerStart:
    """A server start that a control log recorded since its daemon last started, and the last command
    after it that set the daemon's default limits (None: none since). MPS applies a default only to the
    servers started after it was set, so a server with `limits_after` runs with the defaults of before."""

    log_dir: str
    started: LogEvent  # server_started
    limits_after: LogEvent | None = None  # limits_set

    @property
    def before_limits(self) -> bool:
        return self.limits_after is not None


@dataclass(frozen=True)
class MpsLogsData:
    dirs: tuple[LogDirState, ...]
    recent: tuple[tuple[str, LogEvent], ...]  # (log_dir, event), oldest first, bounded
    fatal_errors: Mapping[int, tuple[str, LogEvent]] = field(default_factory=frozen_map)  # server PID -> latest
    discovery_notes: tuple[str, ...] = ()
    server_starts: Mapping[int, ServerStart] = field(default_factory=frozen_map)  # server PID -> its start, bounded


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    kind: str  # mps_client | mps_server | exclusive
    memory_bytes: int | None


@dataclass(frozen=True)
class GpuState:
    index: int
    uuid: str | None
    name: str | None
    up: bool  # False: NVML calls for this GPU fail (e.g. GPU lost); only identity is known
    error: str | None = None
    compute_mode: str | None = None
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None
    gpm_supported: bool | None = None
    sm_active_ratio: float | None = None
    sm_occupancy_ratio: float | None = None
    dram_bandwidth_ratio: float | None = None
    tensor_active_ratio: float | None = None
    processes: tuple[GpuProcess, ...] | None = None
    xid_counts: Mapping[int, int] = field(default_factory=frozen_map)


@dataclass(frozen=True)
class XidEvent:
    time: float
    uuid: str
    xid: int


@dataclass(frozen=True)
class GpuData:
    driver_version: str | None
    gpus: tuple[GpuState, ...]
    recent_xids: tuple[XidEvent, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineState:
    name: str  # the `engine` label: unique among the node's engines
    url: str | None  # where it is scraped; None while a discovered engine cannot be reached
    found_by: str  # configured | discovered
    up: bool
    kind: str | None = None  # engine_kinds.KINDS: as its last answer was read, configured, or its command line's
    error: str | None = None
    model: str | None = None
    gpu_uuid: str | None = None
    pids: tuple[int, ...] = ()  # the engine's processes: API server and its descendants
    owner_uid: int | None = None  # the user its API server runs as (None: no process, or gone)
    gpu_pids: tuple[int, ...] = ()  # those that hold a GPU context
    mps_attached: bool | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    preemptions_total: float | None = None
    tokens_per_second: float | None = None
    kv_cache_usage_ratio: float | None = None
    gpu_memory_utilization: float | None = None
    prompt_tokens_per_request: float | None = None
    generation_tokens_per_request: float | None = None
    model_parameters: float | None = None
    load_share_ratio: float | None = None
    cpu_seconds_total: float | None = None
    busiest_thread_cpu_ratio: float | None = None
    runqueue_wait_seconds_total: float | None = None
    cpu_bound: bool | None = None
    mps_pipe_dir: str | None = None  # CUDA_MPS_PIPE_DIRECTORY, MPS's default when unset; None: environment hidden
    mps_pipe_dir_set: bool | None = None  # whether its environment sets CUDA_MPS_PIPE_DIRECTORY
    # True: the pipe dir's watched daemon answers; False: that daemon is not running; None: unknown
    # (then pipe_dir_served_detail says why: not watched, or the daemon cannot be queried)
    pipe_dir_served: bool | None = None
    pipe_dir_served_detail: str | None = None
    mps_active_thread_percentage: str | None = None
    mps_pinned_device_mem_limit: str | None = None
    # the MPS limits in force for the engine's client (derived); None: the engine is not a client of a
    # watched daemon's server
    active_thread_limit: MpsLimit | None = None
    pinned_memory_limit: MpsLimit | None = None
    # samples of its answers refused since the agent started, by reason (engine_kinds.REJECT_REASONS);
    # and why samples of its last answer were (their figures are then unknown)
    rejected_samples_total: Mapping[str, int] = field(default_factory=frozen_map)
    rejected_reasons: tuple[str, ...] = ()
    # its latencies (engine_kinds.LATENCIES) over the last latency window, from its own histograms,
    # and the time that window spans; None and absent: fewer than two scrapes with histograms in it
    latencies: Mapping[str, LatencyFigures] = field(default_factory=frozen_map)
    latency_window_seconds: float | None = None
    latency_histograms: tuple[str, ...] = ()  # the latencies its last answer has histograms for
    # (sum, count) of each latency histogram in its last answer, for figures over other windows (interference)
    latency_totals: Mapping[str, tuple[float, float]] = field(default_factory=frozen_map)
    scraped_at: float | None = None  # monotonic time its last answer arrived; None: down


LIMIT_SOURCES = ("client_env", "server", "daemon_default")


@dataclass(frozen=True)
class MpsLimit:
    """One MPS limit in force for an engine's client: the value (a thread share from 0 to 1, or bytes),
    where it comes from (one of LIMIT_SOURCES), and a line saying so. `value` None: no limit is in
    force, or it is unknown; `detail` says which."""

    value: float | None
    source: str | None
    detail: str


@dataclass(frozen=True)
class EnginesData:
    """What the engines collector sees on its own; the fields of EngineState that need the other
    collectors (GPU, MPS attachment, served pipe dir, load share) are filled by the derive step."""

    engines: tuple[EngineState, ...]
    cpu_pressure: Mapping[str, float]  # avg10 / avg60 -> ratio
    notes: tuple[str, ...] = ()
    # engines whose environment (their MPS settings) could not be read, by reason
    unreadable_environments: Mapping[str, int] = field(default_factory=frozen_map)


@dataclass(frozen=True)
class PodCgroup:
    """What a process's cgroup path says of its pod: the pod's UID and, inside one of its containers,
    the container's ID (None: the pod's own cgroup, outside any container)."""

    pod_uid: str
    container_id: str | None


@dataclass(frozen=True)
class ContainerEnv:
    """What one of a container's processes says of its pod: HOSTNAME in its environment (the pod's
    name unless the pod sets a hostname) and its service-account namespace file. None: not there."""

    hostname: str | None
    namespace: str | None


@dataclass(frozen=True)
class ContainerAssignment:
    """One container as the kubelet's PodResources List gives it: no pod UID, no container ID."""

    namespace: str
    pod: str
    container: str
    device_ids: tuple[str, ...]  # device plugin IDs: GPU UUIDs, or replica IDs `GPU-<uuid>::<n>`


@dataclass(frozen=True)
class PodResourcesState:
    """The kubelet's PodResources socket: whether it is there and how its List calls went."""

    socket: str
    up: bool | None = None  # the last List answered; None: no socket (off Kubernetes, not mounted), not called
    error: str | None = None  # the last failure, as `<reason>: <detail>`
    failures: Mapping[str, int] = field(default_factory=frozen_map)  # reason -> count since the agent started


@dataclass(frozen=True)
class PodsData:
    """Pod identities of the node's processes, unjoined: the cgroup of each process in a pod, what
    each container's environment says, and the kubelet's assignments (joined in mpswatch.derive)."""

    processes: Mapping[int, PodCgroup]  # pid -> its pod, for processes in a pod's cgroup (bounded)
    environments: Mapping[str, ContainerEnv | None]  # container ID -> its environment; None: unreadable
    assignments: tuple[ContainerAssignment, ...] | None  # None: PodResources gave no answer
    pod_resources: PodResourcesState
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PodIdentity:
    """A process's pod as the derive step resolved it; only the UID when its name is unknown."""

    pod_uid: str
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None

    @property
    def name(self) -> str | None:
        """`namespace/pod`, as `status` shows it; None when unknown."""
        return f"{self.namespace}/{self.pod}" if self.namespace and self.pod else None


@dataclass(frozen=True)
class FaultClient:
    """A client of a server that faulted or died, as the derive step knows it: its engine and pod as
    seen now, or when it was last seen (None: unknown, or not an engine's / in no pod)."""

    pid: int
    engine: str | None = None
    pod: PodIdentity | None = None


@dataclass(frozen=True)
class Comeback:
    """Where a client of a faulted server is back: a client of another server (or of the same one once
    it recovered) with the same engine name or the same pod name, under a new PID."""

    pipe_dir: str
    server_pid: int
    client: FaultClient
    by: str  # engine | pod: what the two have in common


@dataclass(frozen=True)
class SharedClient:
    """One client that shared a server when it faulted or died, and what became of it."""

    client: FaultClient
    blamed: bool  # the client MPS's log blames for the fatal GPU error
    attached: bool | None  # still a client of that server; None: unknown (its daemon gave no client list)
    back_on: Comeback | None = None


BLAST_STATES = ("fault", "recovered", "gone")


@dataclass(frozen=True)
class BlastRadius:
    """What one MPS server's fault or death reached: the client its log blames (MPS can blame an
    innocent client that was only running kernels) and every client that shared the server then,
    remembered by the derive step from the control daemon's `ps` before they were torn down."""

    pipe_dir: str
    server_pid: int
    # fault: in FAULT as its daemon last answered; recovered: out of FAULT again; gone: no longer listed
    # while its daemon answers (died with its clients, or left after its fault)
    state: str
    fatal_error: tuple[str, LogEvent] | None  # (log_dir, the latest fatal_gpu_error its log shows)
    clients: tuple[SharedClient, ...]  # the blamed client among them, also when `ps` never listed it

    @property
    def blamed(self) -> SharedClient | None:
        return next((c for c in self.clients if c.blamed), None)


@dataclass(frozen=True)
class CollectorStatus:
    name: str
    success: bool
    duration_seconds: float | None
    last_success_time: float | None
    errors_total: Mapping[str, int]
    error_reason: str | None = None
    error_detail: str | None = None
    # how old a successful run may be before its data counts as stale (mpswatch.scheduler)
    stale_after_seconds: float | None = None


@dataclass(frozen=True)
class CollectorReport:
    status: CollectorStatus
    data: object | None


@dataclass(frozen=True)
class ProcessData:
    """The agent's own process figures read this cycle, by metric name (process_*); one left out is
    one /proc could not give."""

    values: Mapping[str, float]


@dataclass(frozen=True)
class NodeSnapshot:
    """Every collector's latest data in a typed field named after the collector (None: unknown,
    failed or not run yet), their run statuses, and the facts derived from them together."""

    statuses: Mapping[str, CollectorStatus] = field(default_factory=frozen_map)
    mps_control: MpsControlData | None = None
    mps_logs: MpsLogsData | None = None
    gpu: GpuData | None = None
    engines: EnginesData | None = None
    pods: PodsData | None = None
    process: ProcessData | None = None
    derived: DerivedFacts = field(default_factory=lambda: DerivedFacts())
    log_lines_dropped: Mapping[str, int] = field(default_factory=frozen_map)  # the agent's own, by reason


EXPECTATION_REASONS = ("configured", "engine_pipe_dir", "no_engine_pipe_dir")


@dataclass(frozen=True)
class MpsExpectation:
    """Whether the node's GPUs are meant to be shared through MPS, and how that was decided: `configured`
    (mps_control.expected), or in auto mode `engine_pipe_dir` (an engine's environment sets
    CUDA_MPS_PIPE_DIRECTORY) or `no_engine_pipe_dir` (no engine's does)."""

    expected: bool
    reason: str  # one of EXPECTATION_REASONS
    detail: str  # one line for people


@dataclass(frozen=True)
class DerivedFacts:
    """Facts that join collectors, computed in one place (mpswatch.derive) after each publish."""

    engines: tuple[EngineState, ...] = ()  # the engines collector's, with the joined fields filled in
    engine_of_pid: Mapping[int, str] = field(default_factory=frozen_map)
    imbalance: Mapping[str, float] = field(default_factory=frozen_map)  # gpu_uuid -> busiest share / fair share
    advice: tuple[Advice, ...] = ()
    gpu_memory_by_pid: Mapping[int, int | None] = field(default_factory=frozen_map)
    fault_causes: Mapping[int, tuple[str, LogEvent]] = field(default_factory=frozen_map)  # server pid -> event
    # every server in FAULT now, and those that faulted or died with clients not long ago (mpswatch.derive)
    blast_radius: tuple[BlastRadius, ...] = ()
    # pid -> its pod, for MPS clients, GPU processes and engines' processes in a pod's cgroup
    pods: Mapping[int, PodIdentity] = field(default_factory=frozen_map)
    engine_pods: Mapping[str, PodIdentity] = field(default_factory=frozen_map)  # engine name -> its API server's pod
    mps_expected: MpsExpectation | None = None  # None: unknown (no control data, or engines' environments hidden)
    # (pipe_dir, server_pid) -> the server's start as its daemon's control log recorded it, for the
    # listed servers whose start is in the log
    server_starts: Mapping[tuple[str, int], ServerStart] = field(default_factory=frozen_map)
    # engine name -> what the noisy-neighbour rule makes of it (mpswatch.interference), for up engines on a GPU
    interference: Mapping[str, Interference] = field(default_factory=frozen_map)
