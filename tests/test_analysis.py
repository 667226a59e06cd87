"""Verdicts from snapshots, without processes."""

from __future__ import annotations

from mpswatch.analysis import health_report, render_text
from mpswatch.scheduler import SnapshotStore
from mpswatch.snapshot import (
    CollectorReport,
    CollectorStatus,
    DaemonState,
    EnginesData,
    EngineState,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsServer,
    frozen_map,
)

from tests.kit.snapshots import snapshot_of


def snapshot(data, success=True, reason=None):
    store = SnapshotStore()
    status = CollectorStatus("mps_control", success, 0.01, 1.0, frozen_map(), reason, reason and "detail")
    store.publish(CollectorReport(status, data))
    return store.current()


def daemon(**kw):
    base = dict(pipe_dir="/run/nvidia-mps", found_by="default", state=DaemonState.UP, reason="answering",
                servers=(MpsServer(476, 0, "ACTIVE", 100.0),), clients=(MpsClient(437, 1, 476, "GPU-a", "ns", "py"),))
    base.update(kw)
    return MpsDaemon(**base)


def report(*daemons, **kw):
    return health_report(snapshot(MpsControlData(daemons, ("/run/nvidia-mps",)), **kw), "test", now=100.0)


def test_an_unknown_client_list_makes_the_server_degraded_not_ok():
    r = report(daemon(clients=None))
    [server] = r["daemons"][0]["servers"]
    assert server["verdict"] == "DEGRADED" and "client list unavailable" in server["reason"]
    assert r["verdict"] == "DEGRADED"


def test_clients_of_a_server_missing_from_the_server_list_say_so():
    r = report(daemon(servers=()))
    [server] = r["daemons"][0]["servers"]
    assert server["pid"] == 476 and "not in get_server_list" in server["reason"]


def test_a_failed_collector_is_named_in_the_summary():
    r = health_report(snapshot(None, success=False, reason="timeout"), "test", now=100.0)
    assert r["verdict"] == "DOWN" and r["summary"] == "collector mps_control: timeout: detail"
    assert r["problems"] == [{"verdict": "DOWN", "kind": "collector", "subject": "collector mps_control",
                              "reason": "timeout: detail"}]
    assert render_text(r).splitlines()[1] == "DOWN      collector mps_control: timeout: detail"


def test_everything_ok_is_ok():
    r = report(daemon())
    assert r["verdict"] == "OK" and r["daemons"][0]["servers"][0]["reason"] == "ACTIVE; clients 1/48 on GPU-a"


def engines_snapshot(*engines):
    return snapshot_of(engines=EnginesData(tuple(engines), frozen_map()),
                       mps_control=MpsControlData((daemon(),), ("/run/nvidia-mps",)))


def test_engines_of_a_gpu_are_shown_side_by_side_with_their_problems():
    a = EngineState("a:8001", "http://127.0.0.1:8001/metrics", "discovered", True, gpu_uuid="GPU-a",
                    mps_attached=True, load_share_ratio=0.75, tokens_per_second=1500.0, requests_running=4,
                    requests_waiting=0, busiest_thread_cpu_ratio=0.95, cpu_bound=True, gpu_memory_utilization=0.6)
    b = EngineState("b:8002", "http://127.0.0.1:8002/metrics", "discovered", True, gpu_uuid="GPU-a",
                    mps_attached=False, load_share_ratio=0.25, tokens_per_second=500.0, gpu_memory_utilization=0.6)
    c = EngineState("c:8003", "http://127.0.0.1:8003/metrics", "configured", False, error="connection refused")
    r = health_report(engines_snapshot(a, b, c), "test", now=100.0)
    verdicts = {e["name"]: (e["verdict"], e["reason"]) for e in r["engines"]}
    assert verdicts["a:8001"][0] == "DEGRADED" and verdicts["a:8001"][1].startswith("CPU-bound: busiest thread at 95%")
    assert "share 75%, 1500 tok/s, running 4, waiting 0, MPS attached" in verdicts["a:8001"][1]
    assert verdicts["b:8002"][0] == "DEGRADED" and "runs on the GPU without MPS" in verdicts["b:8002"][1]
    assert verdicts["c:8003"] == ("DOWN", "metrics endpoint: connection refused")
    [group, unknown] = r["engine_gpus"]
    assert group["gpu_uuid"] == "GPU-a" and group["verdict"] == "DEGRADED" and "add up to 1.20 > 1" in group["reason"]
    assert unknown["gpu_uuid"] is None and unknown["engines"] == ["c:8003"]
    text = render_text(r)
    assert "DEGRADED  engines on GPU-a: the engines' gpu_memory_utilization add up to 1.20 > 1" in text


def clients(server_pid, first_pid, n):
    return tuple(MpsClient(pid, 1, server_pid, "GPU-a", "ns", "python3") for pid in range(first_pid, first_pid + n))


def test_a_48_client_node_says_its_worst_problem_first_and_counts_its_healthy_clients():
    """46 clients of an ACTIVE server and 2 of a server in FAULT: the FAULT is named on the first line,
    the problems follow (DOWN, then DEGRADED), and the 46 healthy clients are one line."""
    d = daemon(servers=(MpsServer(476, 0, "ACTIVE", 100.0), MpsServer(632, 0, "FAULT", 100.0)),
               clients=clients(476, 1000, 46) + clients(632, 437, 2))
    r = report(d)
    lines = render_text(r).splitlines()
    fault = "FAULT: a client hit a fatal GPU error; new clients are refused until every affected client exits"
    assert lines[0] == f"DOWN      mpswatch test: server 632 on /run/nvidia-mps: {fault}; 3 more problems"
    assert lines[1:5] == [
        f"DOWN      server 632 on /run/nvidia-mps: {fault}",
        "DOWN      blast radius of server 632 on /run/nvidia-mps: the MPS log names no client; "
        "2 clients shared the server: 437 still attached, 438 still attached",
        "DEGRADED  client 437 python3 of server 632: server 632 is in FAULT: this client must exit before it recovers",
        "DEGRADED  client 438 python3 of server 632: server 632 is in FAULT: this client must exit before it recovers",
    ]
    assert lines[5:8] == [
        "OK        daemon /run/nvidia-mps: answering",
        "OK          server 476 uid 0: ACTIVE; clients 46/48 on GPU-a",
        "OK            46 clients connected",
    ]
    assert len(lines) == 8
    assert [(p["verdict"], p["kind"]) for p in r["problems"]] == [
        ("DOWN", "server"), ("DOWN", "fault"), ("DEGRADED", "client"), ("DEGRADED", "client")]
    assert len(r["daemons"][0]["servers"][0]["clients"]) == 46  # the JSON keeps every client


def test_a_full_server_is_a_problem_and_its_healthy_clients_are_counted_under_its_daemon():
    r = report(daemon(clients=clients(476, 1000, 48)))
    lines = render_text(r).splitlines()
    assert lines == [
        "DEGRADED  mpswatch test: server 476 on /run/nvidia-mps: 48/48 clients on GPU-a: the next client will be refused",
        "DEGRADED  server 476 on /run/nvidia-mps: 48/48 clients on GPU-a: the next client will be refused",
        "OK        daemon /run/nvidia-mps: answering",
        "OK          48 clients of server 476 connected",
    ]


def test_the_agents_own_failure_comes_after_the_nodes_problems():
    store = SnapshotStore()
    store.publish(CollectorReport(CollectorStatus("mps_control", True, 0.01, 1.0, frozen_map()),
                                  MpsControlData((daemon(state=DaemonState.STALE_PID_FILE, reason="stale pid file",
                                                         servers=(), clients=()),), ("/run/nvidia-mps",))))
    store.publish(CollectorReport(CollectorStatus("gpu", False, 0.01, None, frozen_map(), "nvml_unavailable", "no driver"), None))
    r = health_report(store.current(), "test", now=100.0)
    assert [p["subject"] for p in r["problems"]] == ["daemon /run/nvidia-mps", "collector gpu"]
    assert r["summary"] == "daemon /run/nvidia-mps: stale pid file; 1 more problem"


def test_a_one_shot_reports_unknown_rates_once_and_says_why():
    a = EngineState("a:8001", "http://127.0.0.1:8001/metrics", "discovered", True, gpu_uuid="GPU-a", pids=(10,),
                    requests_running=1, requests_waiting=0)
    b = EngineState("b:8002", "http://127.0.0.1:8002/metrics", "discovered", True, gpu_uuid="GPU-a", pids=(20,),
                    requests_running=1, requests_waiting=0)
    r = health_report(engines_snapshot(a, b), "test", now=100.0)
    text = render_text(r)
    assert text.count("needs two samples") == 1
    assert r["notes"] == ["? for tokens/s, load shares, imbalance, busiest thread: "
                          "needs two samples, and `mpswatch status` looks once (`--agent URL` asks the running agent)"]
    assert "engine a:8001: share ?, ? tok/s, running 1, waiting 0, MPS attachment unknown, busiest thread ?" in text


def test_known_rates_need_no_note():
    a = EngineState("a:8001", "http://127.0.0.1:8001/metrics", "discovered", True, gpu_uuid="GPU-a", pids=(10,),
                    tokens_per_second=10.0, busiest_thread_cpu_ratio=0.2)
    assert health_report(engines_snapshot(a), "test", now=100.0)["notes"] == []


def test_a_healthy_engine_of_a_gpu_with_a_problem_names_its_gpu():
    a = EngineState("a:8001", "http://127.0.0.1:8001/metrics", "discovered", True, gpu_uuid="GPU-a",
                    tokens_per_second=10.0, gpu_memory_utilization=0.6)
    b = EngineState("b:8002", "http://127.0.0.1:8002/metrics", "discovered", True, gpu_uuid="GPU-a",
                    tokens_per_second=10.0, gpu_memory_utilization=0.6)
    lines = render_text(health_report(engines_snapshot(a, b), "test", now=100.0)).splitlines()
    assert lines[1] == "DEGRADED  engines on GPU-a: the engines' gpu_memory_utilization add up to 1.20 > 1"
    assert [l[:35] for l in lines if " engine " in l] == ["OK        engine a:8001 on GPU-a: s", "OK        engine b:8002 on GPU-a: s"]



def test_a_client_in_trouble_is_named_with_its_pod():
    from mpswatch.snapshot import ContainerAssignment, ContainerEnv, PodCgroup, PodResourcesState, PodsData

    pods = PodsData(
        processes=frozen_map({437: PodCgroup("0f1e2d3c-aaaa-bbbb-cccc-000000000001", "c1")}),
        environments=frozen_map({"c1": ContainerEnv("vllm-a", "team-a")}),
        assignments=(ContainerAssignment("team-a", "vllm-a", "vllm", ("GPU-a",)),),
        pod_resources=PodResourcesState("/var/lib/kubelet/pod-resources/kubelet.sock", up=True),
    )
    faulted = daemon(servers=(MpsServer(476, 0, "FAULT", 100.0),))
    r = health_report(snapshot_of(mps_control=MpsControlData((faulted,), ("/run/nvidia-mps",)), pods=pods),
                      "test", now=100.0)
    assert "DEGRADED  client 437 (pod team-a/vllm-a) py of server 476:" in render_text(r)
