"""The one place where collectors' data meet: which engine a GPU process or MPS client belongs to,
an engine's GPU and MPS attachment, whether a daemon serves its pipe dir, the load balance between
the engines of a GPU, the advisor's verdicts, and the log line that explains a server's FAULT.

Runs after every collector publish (mpswatch.scheduler), without I/O, on the latest data of each.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from mpswatch.advisor import VERDICTS, Advice, advise_node
from mpswatch.metrics import Families
from mpswatch.snapshot import DerivedFacts, EngineState, GpuData, MpsControlData, NodeSnapshot, frozen_map


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
            served = served_pipe_dirs(snapshot.mps_control)
            joined = []
            for engine in snapshot.engines.engines:
                remembered = engine.gpu_uuid or self._engine_gpu.get(engine.name)
                state = join_engine(replace(engine, gpu_uuid=remembered), gpu_kinds, mps_clients, served)
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


def served_pipe_dirs(control: MpsControlData | None) -> set[str] | None:
    """Pipe dirs of the daemons that answer; None when the control collector has no data."""
    if control is None:
        return None
    return {d.pipe_dir for d in control.daemons if d.up}


def join_engine(
    engine: EngineState,
    gpu_kinds: Mapping[int, tuple[str | None, str]],
    mps_clients: Mapping[int, str],
    served: set[str] | None,
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
    pipe_dir = engine.mps_pipe_dir
    return replace(
        engine,
        gpu_uuid=gpu_uuid,
        gpu_pids=tuple(on_gpu),
        mps_attached=attached,
        pipe_dir_served=None if pipe_dir is None or served is None else pipe_dir in served,
    )


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
