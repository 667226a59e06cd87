"""The one place where collectors' data meet: which engine a GPU process or MPS client belongs to,
an engine's GPU and MPS attachment, whether a daemon serves its pipe dir, whether MPS is expected on
the node, the load balance between the engines of a GPU, the advisor's verdicts, and the log line
that explains a server's FAULT.

Runs after every collector publish (mpswatch.scheduler), without I/O, on the latest data of each.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from mpswatch.advisor import VERDICTS, Advice, advise_node
from mpswatch.metrics import Families
from mpswatch.snapshot import (
    DaemonState,
    DerivedFacts,
    EnginesData,
    EngineState,
    GpuData,
    MpsControlData,
    MpsExpectation,
    NodeSnapshot,
    frozen_map,
)

# A watched daemon in one of these states serves nothing: its pipe dir is not served. In the others
# that are not up (hung, control program missing, garbage), the agent cannot tell.
NOT_RUNNING = frozenset({DaemonState.NOT_RUNNING, DaemonState.STALE_PID_FILE, DaemonState.NO_PIPE_DIR})


class Deriver:
    """Stateful only in what it remembers of each engine's GPU: an engine that goes down keeps its
    GPU label, so its series do not churn while it restarts."""

    def __init__(self) -> None:
        self._engine_gpu: dict[str, str] = {}

    def __call__(self, snapshot: NodeSnapshot) -> DerivedFacts:
        engines: tuple[EngineState, ...] = ()
        if snapshot.engines is not None:
            gpu_kinds = gpu_processes(snapshot.gpu)
            mps_clients = mps_client_devices(snapshot.mps_control)
            joined = []
            for engine in snapshot.engines.engines:
                remembered = engine.gpu_uuid or self._engine_gpu.get(engine.name)
                state = join_engine(replace(engine, gpu_uuid=remembered), gpu_kinds, mps_clients, snapshot.mps_control)
                joined.append(state)
            self._engine_gpu = {e.name: e.gpu_uuid for e in joined if e.gpu_uuid is not None}
            engines = tuple(joined)
        engines, imbalance = balanced(engines)
        advice: tuple[Advice, ...] = ()
        if snapshot.engines is not None and snapshot.gpu is not None:
            advice = tuple(advise_node(snapshot.gpu.gpus, engines, imbalance))
        return DerivedFacts(
            engines=engines,
            engine_of_pid=frozen_map({pid: e.name for e in engines for pid in e.pids}),
            imbalance=frozen_map(imbalance),
            advice=advice,
            gpu_memory_by_pid=frozen_map(
                {p.pid: p.memory_bytes for g in snapshot.gpu.gpus for p in g.processes or ()} if snapshot.gpu else {}
            ),
            fault_causes=snapshot.mps_logs.fatal_errors if snapshot.mps_logs else frozen_map(),
            mps_expected=mps_expectation(snapshot.mps_control, snapshot.engines),
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


def render(facts: DerivedFacts, out: Families) -> None:
    """The families that belong to no one collector: the advisor's."""
    for a in facts.advice:
        if a.gain_estimate is None:
            continue
        out.add("mps_gpu_mps_gain_estimate_ratio", [a.gpu_uuid], a.gain_estimate)
        for verdict in VERDICTS:
            out.add("mps_gpu_mps_verdict", [a.gpu_uuid, verdict], 1 if a.verdict == verdict else 0)
