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
    assert r["verdict"] == "DOWN" and r["summary"].startswith("MPS control collector gave no data: timeout")
    assert "collector mps_control: timeout" in render_text(r)


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
