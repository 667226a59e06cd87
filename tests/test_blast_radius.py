"""The blast radius of an MPS server's fault or death, as the derive step joins it: the client MPS's
log blames (with its pod, worded as MPS's claim), every client that shared the server when it
faulted (remembered from the control daemon's `ps` before they were torn down), and whether each
came back on another server; how long it is remembered; how it shows in `status` and /metrics."""

from __future__ import annotations

from mpswatch.analysis import health_report, render_text
from mpswatch.derive import FAULT_KEPT_SECONDS, MAX_FAULTS_KEPT, Deriver
from mpswatch.exposition import render
from mpswatch.scheduler import SnapshotStore
from mpswatch.snapshot import (
    CollectorReport,
    ContainerAssignment,
    ContainerEnv,
    DaemonState,
    EnginesData,
    EngineState,
    LogEvent,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsLogsData,
    MpsServer,
    PodCgroup,
    PodResourcesState,
    PodsData,
    frozen_map,
)

from tests.kit.snapshots import ok_status, snapshot_of

PIPE, OTHER_PIPE, LOG = "/run/nvidia-mps", "/run/nvidia/mps/gpu1/pipe", "/var/log/nvidia-mps"
FAULT_TIME = 1_000.0


def server(pid: int, status: str = "ACTIVE") -> MpsServer:
    return MpsServer(pid, 0, status, 100.0)


def control(*daemons: MpsDaemon) -> MpsControlData:
    return MpsControlData(tuple(daemons), (PIPE,))


def daemon(servers: dict[int, str], clients: dict[int, tuple[int, ...]] | None, pipe_dir: str = PIPE,
           state: DaemonState = DaemonState.UP) -> MpsDaemon:
    """servers: PID -> status; clients: server PID -> client PIDs (None: `ps` gave no answer)."""
    listed = None if clients is None else tuple(
        MpsClient(pid, 1, spid, "GPU-a", "ns", "python3") for spid, pids in clients.items() for pid in pids)
    return MpsDaemon(pipe_dir, "default", state, "answering" if state is DaemonState.UP else "not running",
                     servers=tuple(server(pid, status) for pid, status in servers.items()), clients=listed)


def pods(**where: str) -> PodsData:
    """pods(p513="team-b/vllm-b"): each PID in a container of that pod, named by its environment."""
    processes, environments, assignments = {}, {}, []
    for key, name in where.items():
        pid, (namespace, pod) = int(key[1:]), name.split("/")
        container = f"c{pid}"
        processes[pid] = PodCgroup(f"{pid:08x}-aaaa-bbbb-cccc-000000000000", container)
        environments[container] = ContainerEnv(pod, namespace)
        assignments.append(ContainerAssignment(namespace, pod, "vllm", ()))
    return PodsData(frozen_map(processes), frozen_map(environments), tuple(assignments),
                    PodResourcesState("/var/lib/kubelet/pod-resources/kubelet.sock", up=True))


def engines(**pids: tuple[int, ...]) -> EnginesData:
    """engines(qwen=(437,)): engines whose processes are those PIDs."""
    return EnginesData(tuple(EngineState(f"{name}:8000", None, "discovered", True, pids=p) for name, p in pids.items()),
                       frozen_map())


def blames(client_pid: int, server_pid: int = 632) -> MpsLogsData:
    event = LogEvent("fatal_gpu_error", FAULT_TIME, "server", server_pid,
                     f"Client {{PID: {client_pid}, Context: 1}} encountered a fatal GPU error.",
                     server_pid=server_pid, client_pid=client_pid)
    return MpsLogsData((), ((LOG, event),), frozen_map({server_pid: (LOG, event)}))


class Node:
    """One agent's derive step across control cycles: each cycle publishes the collectors' data into
    the same store, as the scheduler does, at the time the clock says."""

    def __init__(self) -> None:
        self.now = FAULT_TIME
        self.store = SnapshotStore(Deriver(clock=lambda: self.now))

    def cycle(self, at: float | None = None, **data: object):
        self.now = self.now if at is None else at
        for name, value in data.items():
            self.store.publish(CollectorReport(ok_status(name), value))
        return self.store.current()


def shared(snapshot, server_pid: int = 632) -> dict[int, tuple[bool, bool | None, str | None]]:
    """client PID -> (blamed, still attached, `<server>:<pid> by <engine|pod>` where it came back)."""
    [blast] = [b for b in snapshot.derived.blast_radius if b.server_pid == server_pid]
    return {c.client.pid: (c.blamed, c.attached, c.back_on and f"{c.back_on.server_pid}:{c.back_on.client.pid} by {c.back_on.by}")
            for c in blast.clients}


def test_mps_blames_the_client_its_log_names_with_its_pod_and_status_says_so_as_mps_claim():
    node = snapshot_of(mps_control=control(daemon({632: "FAULT"}, {632: (629, 513)})), mps_logs=blames(513),
                       pods=pods(p513="team-b/vllm-b", p629="team-a/vllm-a"))
    [blast] = node.derived.blast_radius
    assert (blast.pipe_dir, blast.server_pid, blast.state) == (PIPE, 632, "fault")
    assert blast.blamed is not None and blast.blamed.client.pod is not None and blast.blamed.client.pod.name == "team-b/vllm-b"
    assert shared(node) == {513: (True, True, None), 629: (False, True, None)}  # the blamed one first
    report = health_report(node, "test", now=FAULT_TIME + 30)
    line = next(l for l in render_text(report).splitlines() if "blast radius" in l)
    assert line == (f"DOWN      blast radius of server 632 on {PIPE}: MPS blames client 513 (pod team-b/vllm-b) for a "
                    "fatal GPU error 30s ago (MPS can blame an innocent client); 2 clients shared the server: "
                    "513 (pod team-b/vllm-b) still attached, 629 (pod team-a/vllm-a) still attached")
    [entry] = report["blast_radius"]
    assert entry["blamed"] == {"pid": 513, "engine": None, "pod": "team-b/vllm-b"}
    assert entry["fatal_error"]["client_pid"] == 513 and entry["verdict"] == "DOWN"
    assert [(c["pid"], c["blamed"], c["attached"], c["back_on"]) for c in entry["clients"]] == [
        (513, True, True, None), (629, False, True, None)]
    server_line = next(p for p in report["problems"] if p["kind"] == "server")
    assert server_line["reason"].startswith("FAULT: MPS blames client 513 (pod team-b/vllm-b) for a fatal GPU error 30s ago;")


def test_a_client_the_log_blames_is_listed_even_when_ps_never_showed_it():
    node = snapshot_of(mps_control=control(daemon({632: "FAULT"}, {632: (629,)})), mps_logs=blames(513))
    assert shared(node) == {513: (True, False, None), 629: (False, True, None)}


def test_without_a_log_line_the_fault_blames_no_one():
    node = snapshot_of(mps_control=control(daemon({632: "FAULT"}, {632: (629, 513)})))
    [blast] = node.derived.blast_radius
    assert blast.blamed is None and blast.fatal_error is None
    assert "the MPS log names no client; 2 clients shared the server: 629 still attached, 513 still attached" in \
        health_report(node, "test", now=FAULT_TIME)["blast_radius"][0]["reason"]


def test_a_fault_keeps_the_clients_its_server_had_the_cycle_before_with_their_pods_once_they_are_gone():
    node = Node()
    node.cycle(mps_control=control(daemon({632: "ACTIVE"}, {632: (437, 513)})),
               pods=pods(p437="team-a/vllm-a", p513="team-b/vllm-b"))
    # 2 s later: the server is in FAULT, 513 already torn down and its pod's cgroup gone
    after = node.cycle(FAULT_TIME + 2, mps_control=control(daemon({632: "FAULT"}, {632: (437,)})),
                       pods=pods(p437="team-a/vllm-a"), mps_logs=blames(513))
    assert shared(after) == {513: (True, False, None), 437: (False, True, None)}
    [blast] = after.derived.blast_radius
    assert {c.client.pid: c.client.pod.name for c in blast.clients if c.client.pod} == {
        513: "team-b/vllm-b", 437: "team-a/vllm-a"}


def test_a_client_whose_engine_or_pod_is_a_new_client_of_another_server_came_back():
    node = Node()
    node.cycle(mps_control=control(daemon({632: "ACTIVE"}, {632: (437, 513)})),
               engines=engines(qwen=(437,)), pods=pods(p513="team-b/vllm-b"))
    node.cycle(FAULT_TIME + 2, mps_control=control(daemon({632: "FAULT"}, {632: (437, 513)})))
    # both restarted: the engine's new process and the pod's new container on the other daemon's server
    other = daemon({700: "ACTIVE"}, {700: (801, 802)}, OTHER_PIPE)
    back = node.cycle(FAULT_TIME + 60, mps_control=control(daemon({632: "FAULT"}, {632: ()}), other),
                      engines=engines(qwen=(801,)), pods=pods(p802="team-b/vllm-b"))
    assert shared(back) == {437: (False, False, "700:801 by engine"), 513: (False, False, "700:802 by pod")}
    line = next(l for l in render_text(health_report(back, "test", now=FAULT_TIME + 60)).splitlines() if "blast radius" in l)
    assert line.endswith("2 clients shared the server: 437 engine qwen:8000 gone, back on server 700 as 801 engine qwen:8000, "
                         "513 (pod team-b/vllm-b) gone, back on server 700 as 802 (pod team-b/vllm-b)")


def test_a_client_on_the_same_server_once_it_recovered_came_back_and_the_fault_is_kept_as_recovered():
    node = Node()
    node.cycle(mps_control=control(daemon({632: "FAULT"}, {632: (437,)})), engines=engines(qwen=(437,)))
    back = node.cycle(FAULT_TIME + 40, mps_control=control(daemon({632: "ACTIVE"}, {632: (554,)})),
                      engines=engines(qwen=(554,)))
    [blast] = back.derived.blast_radius
    assert blast.state == "recovered" and shared(back) == {437: (False, False, "632:554 by engine")}
    entry = health_report(back, "test", now=FAULT_TIME + 40)["blast_radius"][0]
    assert entry["verdict"] == "DEGRADED" and entry["reason"].startswith("FAULT over; ")


def test_a_process_of_the_same_engine_already_on_another_server_before_the_fault_did_not_come_back():
    """A tensor-parallel engine's second process on another GPU's daemon was there all along."""
    node = Node()
    both = {"engines": engines(qwen=(437, 438))}
    node.cycle(mps_control=control(daemon({632: "ACTIVE"}, {632: (437,)}), daemon({700: "ACTIVE"}, {700: (438,)}, OTHER_PIPE)),
               **both)
    after = node.cycle(FAULT_TIME + 2, mps_control=control(
        daemon({632: "FAULT"}, {632: (437,)}), daemon({700: "ACTIVE"}, {700: (438,)}, OTHER_PIPE)), **both)
    assert shared(after) == {437: (False, True, None)}


def test_a_server_that_vanishes_while_serving_clients_is_remembered_as_gone_and_an_idle_one_is_not():
    node = Node()
    node.cycle(mps_control=control(daemon({476: "ACTIVE", 480: "ACTIVE"}, {476: (437, 438)})))
    after = node.cycle(FAULT_TIME + 2, mps_control=control(daemon({}, {})))
    [blast] = after.derived.blast_radius
    assert (blast.server_pid, blast.state) == (476, "gone")
    assert shared(after, 476) == {437: (False, False, None), 438: (False, False, None)}


def test_a_faulted_server_that_vanishes_stays_listed_as_gone():
    node = Node()
    node.cycle(mps_control=control(daemon({632: "FAULT"}, {632: (437,)})))
    [blast] = node.cycle(FAULT_TIME + 2, mps_control=control(daemon({}, {}))).derived.blast_radius
    assert (blast.server_pid, blast.state) == (632, "gone")


def test_a_daemon_that_stops_answering_or_restarts_tells_nothing_of_its_servers_deaths():
    node = Node()
    node.cycle(mps_control=control(daemon({476: "ACTIVE"}, {476: (437,)})))
    assert node.cycle(FAULT_TIME + 2, mps_control=control(daemon({}, None))).derived.blast_radius == ()
    down = daemon({}, {}, state=DaemonState.NOT_RUNNING)
    assert node.cycle(FAULT_TIME + 4, mps_control=control(down)).derived.blast_radius == ()
    # the daemon restarted, with a new server: the old one was not seen to die (it may run on, unlisted)
    assert node.cycle(FAULT_TIME + 6, mps_control=control(daemon({900: "ACTIVE"}, {900: (901,)}))).derived.blast_radius == ()


def test_a_cycle_whose_ps_fails_keeps_what_each_server_served():
    node = Node()
    node.cycle(mps_control=control(daemon({476: "ACTIVE", 632: "ACTIVE"}, {476: (437,), 632: (513,)})))
    # 632 in FAULT while `ps` fails: its clients are those of the cycle before, attached or not unknown
    after = node.cycle(FAULT_TIME + 2, mps_control=control(daemon({632: "FAULT"}, None)))
    assert [b.server_pid for b in after.derived.blast_radius] == [632] and shared(after) == {513: (False, None, None)}
    later = node.cycle(FAULT_TIME + 4, mps_control=control(daemon({632: "FAULT"}, {632: (513,)})))
    assert [(b.server_pid, b.state) for b in later.derived.blast_radius] == [(632, "fault"), (476, "gone")]


def test_a_fault_is_forgotten_fifteen_minutes_after_its_server_left_fault_and_one_in_fault_is_not():
    node = Node()
    node.cycle(mps_control=control(daemon({632: "FAULT", 633: "FAULT"}, {632: (437,), 633: (438,)})))
    node.cycle(FAULT_TIME + 10, mps_control=control(daemon({633: "FAULT"}, {633: (438,)})))  # 632 gone
    kept = node.cycle(FAULT_TIME + 10 + FAULT_KEPT_SECONDS, mps_logs=blames(437))
    assert [b.server_pid for b in kept.derived.blast_radius] == [632, 633]
    later = node.cycle(FAULT_TIME + 11 + FAULT_KEPT_SECONDS, mps_control=control(daemon({633: "FAULT"}, {633: (438,)})))
    assert [b.server_pid for b in later.derived.blast_radius] == [633]


def test_at_most_sixteen_faults_are_kept_the_oldest_over_ones_first_and_one_in_fault_last():
    node = Node()
    node.cycle(mps_control=control(daemon({7000: "FAULT"}, {7000: (7001,)})))
    for n in range(MAX_FAULTS_KEPT + 4):  # then one server after another dies with its client
        node.cycle(FAULT_TIME + 2 + 2 * n,
                   mps_control=control(daemon({7000: "FAULT", 5000 + n: "ACTIVE"}, {7000: (7001,), 5000 + n: (6000 + n,)})))
    last = node.cycle(FAULT_TIME + 100, mps_control=control(daemon({7000: "FAULT"}, {7000: (7001,)})))
    newest_gone = list(range(5000 + MAX_FAULTS_KEPT + 4 - (MAX_FAULTS_KEPT - 1), 5000 + MAX_FAULTS_KEPT + 4))
    assert [b.server_pid for b in last.derived.blast_radius] == [7000, *newest_gone]


def test_the_blamed_client_is_an_info_series_only_while_the_fault_is_remembered_and_the_log_names_one():
    def blamed(snapshot):
        return [s.labels for m in render(snapshot, "test") for s in m.samples if s.name == "mps_fault_blamed_client_info"]

    faulted = control(daemon({632: "FAULT"}, {632: (629, 513)}))
    assert blamed(snapshot_of(mps_control=faulted, mps_logs=blames(513))) == [
        {"pipe_dir": PIPE, "server_pid": "632", "log_dir": LOG, "pid": "513"}]
    assert blamed(snapshot_of(mps_control=faulted)) == []
    # a fatal error the log shows for a server that is not in FAULT and not remembered: no series
    assert blamed(snapshot_of(mps_control=control(daemon({476: "ACTIVE"}, {476: (437,)})), mps_logs=blames(513))) == []
