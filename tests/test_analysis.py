"""Verdicts from snapshots, without processes."""

from __future__ import annotations

from mpswatch.analysis import health_report, render_text
from mpswatch.snapshot import (
    CollectorReport,
    CollectorStatus,
    DaemonState,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsServer,
    NodeSnapshot,
    frozen_map,
)


def snapshot(data, success=True, reason=None):
    status = CollectorStatus("mps_control", success, 0.01, 1.0, frozen_map(), reason, reason and "detail")
    return NodeSnapshot(frozen_map({"mps_control": CollectorReport(status, data)}))


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
