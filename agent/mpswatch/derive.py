"""The one place where collectors' data meet: which engine a GPU process or MPS client belongs to,
an engine's GPU and MPS attachment, whether a daemon serves its pipe dir, whether MPS is expected on
the node, the load balance between the engines of a GPU, the advisor's verdicts, the log line that
explains a server's FAULT, the Kubernetes pod of every MPS client, GPU process and engine, the
blast radius of a server's fault or death (the client MPS blames, every client that shared the
server, and whether each came back on another server), the servers whose start a control log
recorded (before or after their daemon's limits), the MPS limits each engine's client runs under,
and who slows whom on a shared GPU (mpswatch.interference).

Runs after every collector publish (mpswatch.scheduler), without I/O, on the latest data of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from mpswatch.advisor import MODES, TIME_SLICED, VERDICTS, Advice, QuietGpus, advise_node
from mpswatch.collectors.mps_control import ParseError, parse_percentage, parse_pinned_limits_env
from mpswatch.interference import InterferenceMemory
from mpswatch.metrics import Families
from mpswatch.snapshot import (
    BlastRadius,
    Comeback,
    ContainerAssignment,
    ContainerEnv,
    DaemonState,
    DerivedFacts,
    EnginesData,
    EngineState,
    FaultClient,
    GpuData,
    LogEvent,
    MpsControlData,
    MpsDaemon,
    MpsExpectation,
    MpsLimit,
    MpsLogsData,
    MpsServer,
    NodeSnapshot,
    PodIdentity,
    PodsData,
    ServerStart,
    SharedClient,
    frozen_map,
)

# A watched daemon in one of these states serves nothing: its pipe dir is not served. In the others
# that are not up (hung, control program missing, garbage), the agent cannot tell.
NOT_RUNNING = frozenset({DaemonState.NOT_RUNNING, DaemonState.STALE_PID_FILE, DaemonState.NO_PIPE_DIR})


class Deriver:
    """Stateful only in what it remembers: each engine's GPU (an engine that goes down keeps its GPU
    label, so its series do not churn while it restarts), the names of pods and containers once
    resolved (a pod UID's name and a container ID's name never change), and the clients of each MPS
    server, kept a while after it faulted or died (FaultMemory); and each engine's recent and usual
    figures for the noisy-neighbour rule (InterferenceMemory); and since when each GPU's engines have
    served nothing, for the advisor (QuietGpus)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._engine_gpu: dict[str, str] = {}
        self._pod_names = PodNames()
        self._faults = FaultMemory(clock)
        self._interference = InterferenceMemory()
        self._quiet = QuietGpus()
        self._clock = clock

    def __call__(self, snapshot: NodeSnapshot) -> DerivedFacts:
        engines: tuple[EngineState, ...] = ()
        gpu_kinds = gpu_processes(snapshot.gpu)
        mps_clients = mps_client_devices(snapshot.mps_control)
        if snapshot.engines is not None:
            joined = []
            for engine in snapshot.engines.engines:
                remembered = engine.gpu_uuid or self._engine_gpu.get(engine.name)
                state = join_engine(replace(engine, gpu_uuid=remembered), gpu_kinds, mps_clients, snapshot.mps_control)
                joined.append(state)
            self._engine_gpu = {e.name: e.gpu_uuid for e in joined if e.gpu_uuid is not None}
            engines = tuple(joined)
        engines, imbalance = balanced(engines)
        starts = listed_server_starts(snapshot.mps_control, snapshot.mps_logs)
        servers_of_clients = client_servers(snapshot.mps_control)
        engines = tuple(with_mps_limits(e, servers_of_clients, starts) for e in engines)
        advice: tuple[Advice, ...] = ()
        if snapshot.engines is not None and snapshot.gpu is not None:
            quiet = self._quiet.update(engines, self._clock())
            advice = tuple(advise_node(snapshot.gpu.gpus, engines, imbalance, quiet))
        pod_of_pid: dict[int, PodIdentity] = {}
        if snapshot.pods is not None:
            # MPS servers are on the GPU for their clients: their pod (the device plugin's) holds none
            gpu_of_pid = {**mps_clients, **{pid: uuid for pid, (uuid, kind) in gpu_kinds.items()
                                            if uuid and kind != "mps_server"}}
            pod_of_pid, self._pod_names = resolve_pods(snapshot.pods, gpu_of_pid, self._pod_names)
        engine_of_pid = {pid: e.name for e in engines for pid in e.pids}
        pods = {pid: pod_of_pid[pid] for pid in sorted({*gpu_kinds, *mps_clients}) if pid in pod_of_pid}
        fatal_errors = snapshot.mps_logs.fatal_errors if snapshot.mps_logs else frozen_map()
        identify = Identify(engine_of_pid, pods)
        self._faults.update(snapshot.mps_control, fatal_errors, identify)
        return DerivedFacts(
            engines=engines,
            engine_of_pid=frozen_map(engine_of_pid),
            imbalance=frozen_map(imbalance),
            advice=advice,
            gpu_memory_by_pid=frozen_map(
                {p.pid: p.memory_bytes for g in snapshot.gpu.gpus for p in g.processes or ()} if snapshot.gpu else {}
            ),
            fault_causes=fatal_errors,
            blast_radius=self._faults.blast_radius(snapshot.mps_control, fatal_errors, identify),
            pods=frozen_map(pods),
            engine_pods=frozen_map(engine_pods(engines, pod_of_pid)),
            mps_expected=mps_expectation(snapshot.mps_control, snapshot.engines),
            server_starts=frozen_map(starts),
            interference=frozen_map(self._interference.update(engines)),
        )


def gpu_processes(gpu: GpuData | None) -> dict[int, tuple[str | None, str]]:
    """pid -> (GPU UUID, kind) of every process NVML lists."""
    if gpu is None:
        return {}
    return {p.pid: (g.uuid, p.kind) for g in gpu.gpus for p in g.processes or ()}


def mps_client_devices(control: MpsControlData | None) -> dict[int, str]:
    """pid -> device of every MPS client the daemons list."""
    if control is None:
        return {}
    return {c.pid: c.device for d in control.daemons for c in d.clients or ()}


def pipe_dir_served(pipe_dir: str, control: MpsControlData | None) -> tuple[bool | None, str]:
    """Whether a control daemon serves `pipe_dir`, and a line saying how that is known: True when its
    watched daemon answers, False when that daemon is not running (not_running, stale_pid_file,
    no_pipe_dir), None when the agent cannot tell: the dir is not watched, its daemon is hung, the
    control program cannot run, it answers garbage, or the control collector has no data. What the
    agent cannot see is never "not served"."""
    if control is None:
        return None, "unknown: the MPS control collector has no data"
    daemon = next((d for d in control.daemons if d.pipe_dir == pipe_dir), None)
    if daemon is None:
        narrowed = "only the configured pipe dirs are watched" if control.configured_only else "no daemon was found for it"
        return None, f"unknown: mpswatch does not watch this pipe dir ({narrowed})"
    if daemon.up:
        return True, "served: its control daemon answers"
    if daemon.state in NOT_RUNNING:
        return False, f"not served: {daemon.reason}"
    return None, f"unknown: its control daemon cannot be queried ({daemon.state.value}: {daemon.reason})"


def join_engine(
    engine: EngineState,
    gpu_kinds: Mapping[int, tuple[str | None, str]],
    mps_clients: Mapping[int, str],
    control: MpsControlData | None,
) -> EngineState:
    """The engine's GPU (its own first, then its first process on a GPU: tensor parallel engines
    are placed on their first), whether it runs under MPS, and whether its pipe dir is served."""
    if not engine.pids:
        return engine
    on_gpu = [pid for pid in engine.pids if pid in gpu_kinds]
    kinds = {gpu_kinds[pid][1] for pid in on_gpu}
    if "exclusive" in kinds:
        attached: bool | None = False
    elif "mps_client" in kinds or any(pid in mps_clients for pid in engine.pids):
        attached = True
    else:
        attached = None  # no GPU context seen yet (or no GPU data)
    gpu_uuid = engine.gpu_uuid or next((gpu_kinds[pid][0] for pid in on_gpu), None)
    if gpu_uuid is None:
        gpu_uuid = next((mps_clients[pid] for pid in engine.pids if pid in mps_clients), None)
    served, detail = (None, None) if engine.mps_pipe_dir is None else pipe_dir_served(engine.mps_pipe_dir, control)
    return replace(
        engine,
        gpu_uuid=gpu_uuid,
        gpu_pids=tuple(on_gpu),
        mps_attached=attached,
        pipe_dir_served=served,
        pipe_dir_served_detail=detail,
    )


@dataclass(frozen=True)
class PodNames:
    """What resolve_pods found before, for the pods and containers still there."""

    pods: Mapping[str, tuple[str, str]] = field(default_factory=frozen_map)  # pod UID -> (namespace, pod)
    containers: Mapping[str, str] = field(default_factory=frozen_map)  # container ID -> container name


def assigned_gpu(device_id: str, gpu: str) -> bool:
    """Whether a device plugin ID names the GPU: a UUID, or a replica `<UUID>::<n>` of a shared GPU;
    `gpu` may be cut short, as MPS's `ps` prints it when the driver's /proc files are unreadable."""
    return device_id.split("::", 1)[0].startswith(gpu)


def holders(gpu: str | None, assignments: Iterable[ContainerAssignment]) -> list[ContainerAssignment]:
    """The containers the kubelet gave this GPU (or a replica of it)."""
    if not gpu:
        return []
    return [a for a in assignments if any(assigned_gpu(device_id, gpu) for device_id in a.device_ids)]


def resolve_pods(
    data: PodsData, gpu_of_pid: Mapping[int, str], known: PodNames
) -> tuple[dict[int, PodIdentity], PodNames]:
    """Every process in a pod's cgroup with its pod UID and, where it can be told, the pod's namespace
    and name and the container's name; and what to remember for the next call. docs/kubernetes.md
    gives the order:
      1. the container's environment: HOSTNAME and the service-account namespace name a pod that
         the kubelet's PodResources lists;
      2. the process's GPU: the one container on the node the kubelet gave that GPU (or a replica).
    A container's name is the pod's only container, else the one of the pod's containers that holds
    the GPU of the container's processes. Pod names are claimed once per cycle: a second UID that
    resolves to a pod already named keeps no name."""
    assignments = data.assignments or ()
    by_pod: dict[tuple[str, str], list[ContainerAssignment]] = {}
    for a in assignments:
        by_pod.setdefault((a.namespace, a.pod), []).append(a)
    pids_of_uid: dict[str, list[int]] = {}
    pids_of_container: dict[str, list[int]] = {}
    for pid, cgroup in sorted(data.processes.items()):
        pids_of_uid.setdefault(cgroup.pod_uid, []).append(pid)
        if cgroup.container_id is not None:
            pids_of_container.setdefault(cgroup.container_id, []).append(pid)
    pods = {uid: name for uid, name in known.pods.items() if uid in pids_of_uid}
    containers = {cid: name for cid, name in known.containers.items() if cid in pids_of_container}
    claimed = set(pods.values())
    for by_environ in (True, False):  # every pod its environment names first: a GPU cannot claim them
        for uid, pids in pids_of_uid.items():
            if uid in pods:
                continue
            named = _named_by_environ(data, pids, by_pod) if by_environ else \
                _named_by_device(data, pids, gpu_of_pid, assignments)
            if named is not None and named not in claimed:
                pods[uid] = named
                claimed.add(named)
    for cid, pids in pids_of_container.items():
        uid = data.processes[pids[0]].pod_uid
        if cid in containers or uid not in pods:
            continue
        in_pod = by_pod.get(pods[uid], [])
        candidates = in_pod if len(in_pod) == 1 else [a for pid in pids for a in holders(gpu_of_pid.get(pid), in_pod)]
        names = {a.container for a in candidates}
        if len(names) == 1:
            containers[cid] = names.pop()
    identities = {}
    for pid, cgroup in data.processes.items():
        namespace, pod = pods.get(cgroup.pod_uid, (None, None))
        container = containers.get(cgroup.container_id) if cgroup.container_id is not None else None
        identities[pid] = PodIdentity(cgroup.pod_uid, namespace, pod, container)
    return identities, PodNames(frozen_map(pods), frozen_map(containers))


def _environments(data: PodsData, pids: list[int]) -> list[ContainerEnv]:
    envs = (data.environments.get(data.processes[pid].container_id or "") for pid in pids)
    return [env for env in envs if env is not None]


def _named_by_environ(
    data: PodsData, pids: list[int], by_pod: Mapping[tuple[str, str], list[ContainerAssignment]]
) -> tuple[str, str] | None:
    for env in _environments(data, pids):
        if env.namespace and env.hostname and (env.namespace, env.hostname) in by_pod:
            return env.namespace, env.hostname
    return None


def _named_by_device(
    data: PodsData, pids: list[int], gpu_of_pid: Mapping[int, str], assignments: Iterable[ContainerAssignment]
) -> tuple[str, str] | None:
    """The one pod whose containers hold the GPUs of these processes, in the namespace their
    environment names if it does (a pod given no GPU may still reach one)."""
    namespaces = {env.namespace for env in _environments(data, pids) if env.namespace}
    pods: set[tuple[str, str]] = set()
    for pid in pids:
        found = holders(gpu_of_pid.get(pid), assignments)
        if len(found) > 1:
            return None  # a shared GPU: several containers hold it
        pods.update((a.namespace, a.pod) for a in found)
    if len(pods) != 1:
        return None
    pod = pods.pop()
    return None if namespaces and pod[0] not in namespaces else pod


def engine_pods(engines: Iterable[EngineState], pod_of_pid: Mapping[int, PodIdentity]) -> dict[str, PodIdentity]:
    """Each engine's pod: its API server's (the first of its processes in a pod)."""
    found = {}
    for engine in engines:
        pid = next((pid for pid in engine.pids if pid in pod_of_pid), None)
        if pid is not None:
            found[engine.name] = pod_of_pid[pid]
    return found


def mps_expectation(control: MpsControlData | None, engines: EnginesData | None) -> MpsExpectation | None:
    """Whether MPS is expected on the node: as configured, or in auto mode when an engine's environment
    sets CUDA_MPS_PIPE_DIRECTORY. Unknown (None) without control data, and in auto mode without engine
    data or while an engine's environment is hidden and none shown sets it."""
    if control is None:
        return None
    if control.expected != "auto":
        return MpsExpectation(control.expected == "true", "configured", f"mps_control.expected = {control.expected}")
    if engines is None:
        return None
    local = [e for e in engines.engines if e.pids]
    asking = [e for e in local if e.mps_pipe_dir_set]
    if asking:
        e = asking[0]
        return MpsExpectation(True, "engine_pipe_dir", f"engine {e.name} sets CUDA_MPS_PIPE_DIRECTORY={e.mps_pipe_dir}")
    if any(e.mps_pipe_dir_set is None for e in local):
        return None
    return MpsExpectation(False, "no_engine_pipe_dir", "no engine sets CUDA_MPS_PIPE_DIRECTORY")


def listed_server_starts(
    control: MpsControlData | None, logs: MpsLogsData | None
) -> dict[tuple[str, int], ServerStart]:
    """(pipe_dir, server_pid) -> the server's start as a control log recorded it, for each server a
    daemon lists whose start is in a watched log (joined by the server's PID: the logs do not name
    their pipe dir in a way that survives a container's mounts)."""
    if control is None or logs is None:
        return {}
    return {(d.pipe_dir, s.pid): logs.server_starts[s.pid] for d in control.daemons if d.up
            for s in d.servers if s.pid in logs.server_starts}


def client_servers(control: MpsControlData | None) -> dict[int, tuple[MpsDaemon, int]]:
    """pid -> (daemon, server PID) of every MPS client an answering daemon lists."""
    if control is None:
        return {}
    return {c.pid: (d, c.server_pid) for d in control.daemons if d.up for c in d.clients or ()}


def with_mps_limits(
    engine: EngineState, clients: Mapping[int, tuple[MpsDaemon, int]], starts: Mapping[tuple[str, int], ServerStart]
) -> EngineState:
    """The engine with the MPS limits in force for its client: its first process that a daemon lists
    as a client, that client's server and daemon, against what its environment asks."""
    pid = next((pid for pid in engine.pids if pid in clients), None)
    if pid is None:
        return engine
    daemon, server_pid = clients[pid]
    server = next((s for s in daemon.servers if s.pid == server_pid), None)
    return replace(
        engine,
        active_thread_limit=thread_limit(engine, daemon, server_pid, server),
        pinned_memory_limit=pinned_limit(engine, daemon, server_pid, server, starts.get((daemon.pipe_dir, server_pid))),
    )


def thread_limit(engine: EngineState, daemon: MpsDaemon, server_pid: int, server: MpsServer | None) -> MpsLimit:
    """The share of the GPU's threads the engine's client may use: its server's active thread
    percentage, lowered by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its environment (a client's own
    setting can only lower it: NVIDIA's MPS docs, environment variables)."""
    allowed = server.active_thread_percentage if server is not None else None
    if allowed is None:
        return MpsLimit(None, None, f"unknown: server {server_pid}'s active thread percentage was not read")
    if engine.mps_pipe_dir is None:
        return MpsLimit(None, None, f"unknown: its environment cannot be read (server {server_pid} allows {allowed:g}%)")
    default = daemon.default_active_thread_percentage
    above = f", above the daemon's default of {default:g}% for new servers" if default is not None and allowed > default else ""
    server_says = f"{allowed:g}% from server {server_pid}{above}"
    if engine.mps_active_thread_percentage is None:
        return MpsLimit(allowed / 100, "server", server_says)
    try:
        asked = parse_percentage(engine.mps_active_thread_percentage)
    except ParseError:
        return MpsLimit(None, None, f"unknown: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="
                        f"{engine.mps_active_thread_percentage[:40]!r} in its environment is not a percentage")
    if asked < allowed:
        return MpsLimit(asked / 100, "client_env", f"{asked:g}% from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its "
                        f"environment (server {server_pid} allows {allowed:g}%)")
    return MpsLimit(allowed / 100, "server", f"{server_says} (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={asked:g} in its "
                    "environment cannot raise it)")


def pinned_limit(
    engine: EngineState, daemon: MpsDaemon, server_pid: int, server: MpsServer | None, start: ServerStart | None
) -> MpsLimit:
    """The pinned device memory the engine's client may allocate on its GPU: the daemon's default,
    which MPS gives the servers started after it was set (read for device 0 and taken for every
    device), lowered by CUDA_MPS_PINNED_DEVICE_MEM_LIMIT in its environment (its entry for the
    engine's GPU by UUID, else for device 0). Unknown where the engine's server did not start with the
    daemon's current defaults: the control log says it started before they were set, or its active
    thread percentage is not the daemon's default. A server's own limit is not asked."""
    default_atp = daemon.default_active_thread_percentage
    server_atp = server.active_thread_percentage if server is not None else None
    if start is not None and start.limits_after is not None:
        return MpsLimit(None, None, f"unknown: server {server_pid} started before the daemon's limits were set "
                        f"({start.limits_after.detail}), so the daemon's default is not its own")
    if server_atp is not None and default_atp is not None and server_atp != default_atp:
        return MpsLimit(None, None, f"unknown: server {server_pid} runs at {server_atp:g}% of the threads where the "
                        f"daemon's default is {default_atp:g}%, so it did not start with the daemon's current defaults")
    if not daemon.default_pinned_memory_limit_known:
        return MpsLimit(None, None, "unknown: the daemon's default pinned memory limit was not read")
    if engine.mps_pipe_dir is None:
        return MpsLimit(None, None, "unknown: its environment cannot be read")
    default = daemon.default_pinned_memory_limit_bytes
    asked: int | None = None
    if engine.mps_pinned_device_mem_limit:
        try:
            asked = limit_for_gpu(parse_pinned_limits_env(engine.mps_pinned_device_mem_limit), engine.gpu_uuid)
        except ParseError:
            return MpsLimit(None, None, f"unknown: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="
                            f"{engine.mps_pinned_device_mem_limit[:60]!r} in its environment is not understood")
    if asked is not None and (default is None or asked < default):
        allows = "sets none" if default is None else f"allows {gib(default)}"
        return MpsLimit(asked, "client_env", f"{gib(asked)} from CUDA_MPS_PINNED_DEVICE_MEM_LIMIT in its environment "
                        f"(the daemon's default {allows})")
    if default is not None:
        return MpsLimit(default, "daemon_default", f"{gib(default)}, the daemon's default for new servers")
    return MpsLimit(None, None, "no limit: neither the daemon's default nor its environment sets one")


def limit_for_gpu(limits: Mapping[str, int], gpu_uuid: str | None) -> int | None:
    """A client's pinned memory limit for its GPU: the entry naming the GPU's UUID (or its start), else
    device 0's (a client's first visible device, where the agent places an engine)."""
    for device, limit in limits.items():
        if gpu_uuid and device.startswith("GPU-") and gpu_uuid.startswith(device):
            return limit
    return limits.get("0")


def gib(size: float) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def load_balance(throughput: Mapping[str, float]) -> tuple[dict[str, float], float | None]:
    """Each engine's share of the GPU's tokens/s and the imbalance: the busiest share over the
    fair share (1 = balanced). Nothing when the GPU has no throughput."""
    total = sum(throughput.values())
    if not throughput or total <= 0:
        return {}, None
    shares = {name: tps / total for name, tps in throughput.items()}
    return shares, max(shares.values()) * len(shares)


def balanced(engines: tuple[EngineState, ...]) -> tuple[tuple[EngineState, ...], dict[str, float]]:
    """The engines with their load shares, and each GPU's imbalance."""
    by_gpu: dict[str, dict[str, float]] = {}
    for state in engines:
        if state.up and state.gpu_uuid and state.tokens_per_second is not None:
            by_gpu.setdefault(state.gpu_uuid, {})[state.name] = state.tokens_per_second
    shares: dict[str, float] = {}
    imbalance: dict[str, float] = {}
    for gpu_uuid, throughput in by_gpu.items():
        gpu_shares, ratio = load_balance(throughput)
        shares.update(gpu_shares)
        if ratio is not None:
            imbalance[gpu_uuid] = ratio
    return tuple(replace(s, load_share_ratio=shares.get(s.name)) for s in engines), imbalance


# ---------------------------------------------------------------- the blast radius of a fault

MAX_FAULTS_KEPT = 16  # servers remembered after they faulted or died
# how long a server is remembered after it was last seen in FAULT, left it, or vanished: longer than
# the 10 minutes in which MPSFatalGPUError and MPSServerDied fire
FAULT_KEPT_SECONDS = 900.0


@dataclass(frozen=True)
class Identify:
    """The engine and pod of a PID as this derive step sees them."""

    engine_of_pid: Mapping[int, str]
    pods: Mapping[int, PodIdentity]

    def __call__(self, pid: int) -> FaultClient:
        return FaultClient(pid, self.engine_of_pid.get(pid), self.pods.get(pid))


@dataclass
class _Fault:
    state: str  # as BlastRadius.state
    pids: list[int]  # every client seen on the server, from its last cycle before the fault on
    since: float  # when the agent saw it fault or vanish
    last_seen: float  # when it was last seen in FAULT, or left FAULT, or vanished


class FaultMemory:
    """What the derive step remembers of MPS servers for the blast radius of a fault: each server's
    clients as its daemon's `ps` last listed them; for a server that went to FAULT, or vanished while
    serving clients, those clients and every client seen on it since, kept while it is in FAULT and
    FAULT_KEPT_SECONDS after (at most MAX_FAULTS_KEPT servers, those in FAULT last to go); and the
    engine and pod last seen of each PID it keeps, for clients gone since. A server's state changes
    only with new control data from a daemon that answers: a cycle whose `ps` failed changes no client
    set and sees no server die, and a daemon that goes down forgets what its servers served (as for
    mps_servers_lost_total, its servers are not seen to die: they may run on, unlisted)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._control: MpsControlData | None = None
        self._serving: dict[tuple[str, int], tuple[int, ...]] = {}  # (pipe dir, server PID) -> its clients
        self._first_seen: dict[int, float] = {}  # client PID -> when it was first listed, for those listed
        self._faults: dict[tuple[str, int], _Fault] = {}  # oldest first
        self._seen: dict[int, FaultClient] = {}  # PID -> its engine and pod, as last known

    def update(self, control: MpsControlData | None, fatal_errors: Mapping[int, tuple[str, LogEvent]],
               identify: Identify) -> None:
        now = self._clock()
        if control is not None and control is not self._control:
            self._control = control
            self._cycle(control, now)
        for key, fault in list(self._faults.items()):
            if now - fault.last_seen > FAULT_KEPT_SECONDS:
                del self._faults[key]
        while len(self._faults) > MAX_FAULTS_KEPT:
            over = next((k for k, f in self._faults.items() if f.state != "fault"), next(iter(self._faults)))
            del self._faults[over]
        for (_, server_pid), fault in self._faults.items():
            blamed = fatal_errors.get(server_pid)
            if blamed is not None and blamed[1].client_pid is not None and blamed[1].client_pid not in fault.pids:
                fault.pids.append(blamed[1].client_pid)
        kept = {pid for pids in self._serving.values() for pid in pids} | \
            {pid for fault in self._faults.values() for pid in fault.pids}
        seen: dict[int, FaultClient] = {}
        for pid in kept:
            now_known, before = identify(pid), self._seen.get(pid)
            if before is not None:
                now_known = FaultClient(pid, now_known.engine or before.engine, now_known.pod or before.pod)
            if now_known.engine is not None or now_known.pod is not None:
                seen[pid] = now_known
        self._seen = seen

    def _cycle(self, control: MpsControlData, now: float) -> None:
        watched = {d.pipe_dir for d in control.daemons}
        self._serving = {key: pids for key, pids in self._serving.items() if key[0] in watched}
        listed_clients: set[int] = set()
        for daemon in control.daemons:
            if not daemon.up:  # it takes its servers along, or leaves them running unlisted: no death seen
                self._serving = {key: pids for key, pids in self._serving.items() if key[0] != daemon.pipe_dir}
                continue
            status: dict[int, str | None] = {s.pid: s.status for s in daemon.servers}
            clients: dict[int, list[int]] = {}
            for client in daemon.clients or ():
                clients.setdefault(client.server_pid, []).append(client.pid)
                status.setdefault(client.server_pid, None)
                listed_clients.add(client.pid)
            for server_pid, server_status in status.items():
                key = (daemon.pipe_dir, server_pid)
                pids = tuple(clients.get(server_pid, ()))
                fault = self._faults.get(key)
                if server_status == "FAULT":
                    if fault is None or fault.state != "fault":
                        fault = self._remember(key, "fault", self._serving.get(key, ()), now)
                    fault.pids += [pid for pid in pids if pid not in fault.pids]
                    fault.last_seen = now
                elif fault is not None and fault.state == "fault" and server_status is not None:
                    fault.state, fault.last_seen = "recovered", now
                if daemon.clients is not None:
                    self._serving[key] = pids
            if daemon.clients is None:  # `ps` failed: what each server served before stands
                listed_clients |= {pid for (d, _), pids in self._serving.items() if d == daemon.pipe_dir for pid in pids}
                continue
            for key in [k for k in self._serving if k[0] == daemon.pipe_dir and k[1] not in status]:
                pids = self._serving.pop(key)
                fault = self._faults.get(key)
                if fault is not None and fault.state == "fault":
                    fault.state, fault.last_seen = "gone", now
                elif pids:  # vanished while serving clients: it died and took them with it
                    self._remember(key, "gone", pids, now)
        self._first_seen = {pid: self._first_seen.get(pid, now) for pid in listed_clients}

    def _remember(self, key: tuple[str, int], state: str, pids: Iterable[int], now: float) -> _Fault:
        self._faults.pop(key, None)  # a new fault of a server remembered before starts afresh, as the newest
        fault = self._faults[key] = _Fault(state, list(pids), now, now)
        return fault

    def blast_radius(self, control: MpsControlData | None, fatal_errors: Mapping[int, tuple[str, LogEvent]],
                     identify: Identify) -> tuple[BlastRadius, ...]:
        """Every remembered fault joined with what the node shows now: the blamed client (the log's
        latest fatal error for that server PID), whether each client is still attached, and where it
        came back: a client first listed after the fault, on a server not in FAULT, with the same
        engine or pod name and another PID."""
        attached: dict[tuple[str, int], set[int]] = {}
        elsewhere: list[tuple[str, int, int]] = []  # (pipe dir, server PID, client PID) off servers in FAULT
        for daemon in control.daemons if control is not None else ():
            if not daemon.up or daemon.clients is None:
                continue
            faulted = {s.pid for s in daemon.servers if s.status == "FAULT"}
            for listed in daemon.clients:
                attached.setdefault((daemon.pipe_dir, listed.server_pid), set()).add(listed.pid)
                if listed.server_pid not in faulted:
                    elsewhere.append((daemon.pipe_dir, listed.server_pid, listed.pid))
        known = {d.pipe_dir for d in control.daemons if d.up and d.clients is not None} if control else set()
        found = []
        for (pipe_dir, server_pid), fault in self._faults.items():
            fatal_error = fatal_errors.get(server_pid)
            blamed = fatal_error[1].client_pid if fatal_error is not None else None
            newcomers = [w for w in elsewhere if self._first_seen.get(w[2], fault.since) >= fault.since]
            on_it = attached.get((pipe_dir, server_pid), set())
            shared = []
            for pid in [p for p in fault.pids if p == blamed] + [p for p in fault.pids if p != blamed]:
                client = self._seen.get(pid) or identify(pid)
                back = next((c for w in newcomers if w[2] != pid and (c := _comeback(client, w, identify))), None)
                shared.append(SharedClient(client, pid == blamed, pid in on_it if pipe_dir in known else None, back))
            found.append(BlastRadius(pipe_dir, server_pid, fault.state, fatal_error, tuple(shared)))
        return tuple(found)


def _comeback(client: FaultClient, where: tuple[str, int, int], identify: Identify) -> Comeback | None:
    """`where`'s client, when it has the engine name or the pod name of `client`."""
    candidate = identify(where[2])
    if client.engine is not None and candidate.engine == client.engine:
        return Comeback(where[0], where[1], candidate, "engine")
    name = client.pod.name if client.pod is not None else None
    if name is not None and candidate.pod is not None and candidate.pod.name == name:
        return Comeback(where[0], where[1], candidate, "pod")
    return None


def render(facts: DerivedFacts, out: Families) -> None:
    """The families that belong to no one collector: the advisor's, and the client MPS blames for a
    fault (joined with mps_pod_info by pid in the alerts' annotations)."""
    for a in facts.advice:
        if a.gain_estimate is None:
            continue
        out.add("mps_gpu_mps_gain_estimate_ratio", [a.gpu_uuid], a.gain_estimate)
        for verdict in VERDICTS:
            out.add("mps_gpu_mps_verdict", [a.gpu_uuid, verdict], 1 if a.verdict == verdict else 0)
        for option in a.options:
            if option.mode == TIME_SLICED:
                out.add("mps_gpu_timesliced_gain_estimate_ratio", [a.gpu_uuid], option.gain)
        if a.best_mode is not None:
            for mode in MODES:
                out.add("mps_gpu_best_sharing_mode", [a.gpu_uuid, mode], 1 if a.best_mode == mode else 0)
    for blast in facts.blast_radius:
        if blast.fatal_error is not None and blast.fatal_error[1].client_pid is not None:
            log_dir, event = blast.fatal_error
            out.add("mps_fault_blamed_client_info", [blast.pipe_dir, blast.server_pid, log_dir, event.client_pid], 1)
