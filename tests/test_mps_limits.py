"""The MPS limits in force: servers that started before their daemon's default limits were set (the
device plugin's race, k8s-device-plugin PR 1946), and each engine's effective thread share and pinned
memory limit against what its environment asks; as the derive step joins them, and as /metrics and
`status` show them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mpswatch.analysis import health_report, render_text
from mpswatch.exposition import render
from mpswatch.snapshot import (
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
    ServerStart,
    frozen_map,
)

from tests.kit.snapshots import snapshot_of

PIPE = "/run/nvidia/mps/nvidia.com/gpu/pipe"
LOG = "/run/nvidia/mps/nvidia.com/gpu/log"
GPU = "GPU-2ea0ea17-0206-eb44-7b5a-07c4ed6659bf"
GIB = 1 << 30
NOW = 1_000_000.0


def daemon(server_atp: float | None = 50.0, default_atp: float | None = 50.0, pinned: int | None = 35 * GIB,
           pinned_known: bool = True, clients: tuple[int, ...] = (2210,)) -> MpsDaemon:
    return MpsDaemon(PIPE, "device_plugin", DaemonState.UP, "answering; 1 server(s)", pid=61,
                     servers=(MpsServer(2215, 0, "ACTIVE", server_atp),),
                     clients=tuple(MpsClient(pid, i, 2215, GPU, "4026531836", "python3") for i, pid in enumerate(clients)),
                     default_active_thread_percentage=default_atp, default_pinned_memory_limit_bytes=pinned,
                     default_pinned_memory_limit_known=pinned_known, resource="nvidia.com/gpu")


def engine(atp: str | None = None, pinned: str | None = None, hidden: bool = False, pids=(2210,)) -> EngineState:
    return EngineState("qwen-a", "http://10.0.0.7:8000/metrics", "discovered", True, gpu_uuid=GPU, pids=pids,
                       mps_pipe_dir=None if hidden else PIPE, mps_pipe_dir_set=None if hidden else True,
                       mps_active_thread_percentage=atp, mps_pinned_device_mem_limit=pinned)


def event(name: str, at: float, **fields) -> LogEvent:
    return LogEvent(name, at, "control", 61, name, **fields)


STARTED = event("server_started", NOW - 600.0, server_pid=2215, detail="uid 0")
LIMITS = event("limits_set", NOW - 599.9, detail="set_default_active_thread_percentage 50")


def logs(*starts: ServerStart) -> MpsLogsData:
    return MpsLogsData((), (), server_starts=frozen_map({s.started.server_pid: s for s in starts}))


def snapshot(d: MpsDaemon, *engines: EngineState, mps_logs: MpsLogsData | None = None, pods: PodsData | None = None):
    data: dict = {"mps_control": MpsControlData((d,), (PIPE,))}
    if engines:
        data["engines"] = EnginesData(engines, frozen_map())
    if mps_logs is not None:
        data["mps_logs"] = mps_logs
    if pods is not None:
        data["pods"] = pods
    return snapshot_of(**data)


def families(s) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {m.name: [(x.labels, x.value) for x in m.samples] for m in render(s, "test")}


def limits(d: MpsDaemon, e: EngineState, **kw):
    [joined] = snapshot(d, e, **kw).derived.engines
    t, p = joined.active_thread_limit, joined.pinned_memory_limit
    return (t.value, t.source, t.detail), (p.value, p.source, p.detail)


# ---------------------------------------------------------------- servers started before the limits


def test_a_server_the_log_shows_started_before_the_limits_is_a_problem_naming_its_clients_pods():
    pods = PodsData(
        processes=frozen_map({2210: PodCgroup("0f1e2d3c-aaaa-bbbb-cccc-000000000001", "c1")}),
        environments=frozen_map({"c1": ContainerEnv("vllm-a-0", "team-a")}),
        assignments=(ContainerAssignment("team-a", "vllm-a-0", "vllm", (f"{GPU}::0",)),),
        pod_resources=PodResourcesState("/var/lib/kubelet/pod-resources/kubelet.sock", up=True),
    )
    s = snapshot(daemon(server_atp=100.0), mps_logs=logs(ServerStart(LOG, STARTED, LIMITS)), pods=pods)
    assert families(s)["mps_server_started_before_limits"] == [({"pipe_dir": PIPE, "uid": "0"}, 1.0)]
    report = health_report(s, "test", now=NOW)
    assert report["verdict"] == "DEGRADED"
    [server] = report["daemons"][0]["servers"]
    assert server["started_before_limits"] is True
    assert f"DEGRADED  server 2215 on {PIPE}: started 10m ago, before the daemon's limits were set " \
           "(set_default_active_thread_percentage 50, 10m ago): it runs with the defaults of before (active threads " \
           "100% where the daemon's default is 50%); so do its 1 client(s) (team-a/vllm-a-0)" in render_text(report)


def test_a_server_started_after_the_limits_is_ok_and_says_so_with_a_zero():
    s = snapshot(daemon(), mps_logs=logs(ServerStart(LOG, STARTED)))
    assert families(s)["mps_server_started_before_limits"] == [({"pipe_dir": PIPE, "uid": "0"}, 0.0)]
    report = health_report(s, "test", now=NOW)
    assert report["verdict"] == "OK" and report["daemons"][0]["servers"][0]["started_before_limits"] is False


@pytest.mark.parametrize("mps_logs", [None, logs(), logs(ServerStart(LOG, event("server_started", NOW, server_pid=99)))])
def test_a_server_whose_start_is_in_no_watched_log_has_no_series_and_no_verdict_on_it(mps_logs):
    s = snapshot(daemon(), mps_logs=mps_logs)
    assert "mps_server_started_before_limits" not in families(s)
    assert health_report(s, "test", now=NOW)["daemons"][0]["servers"][0]["started_before_limits"] is None


def test_a_server_in_fault_that_also_started_before_the_limits_keeps_its_worse_verdict_and_says_both():
    faulted = replace(daemon(), servers=(MpsServer(2215, 0, "FAULT", 50.0),))
    report = health_report(snapshot(faulted, mps_logs=logs(ServerStart(LOG, STARTED, LIMITS))), "test", now=NOW)
    [server] = report["daemons"][0]["servers"]
    assert server["verdict"] == "DOWN"
    assert server["reason"].startswith("FAULT") and "before the daemon's limits were set" in server["reason"]


# ---------------------------------------------------------------- the device plugin's resource


def test_a_device_plugin_daemon_exports_its_resource_on_an_info_series_and_in_status():
    s = snapshot(daemon())
    assert families(s)["mps_control_resource_info"] == [({"pipe_dir": PIPE, "resource": "nvidia.com/gpu"}, 1.0)]
    assert families(s)["mps_control_info"] == [({"pipe_dir": PIPE, "pid": "61"}, 1.0)]
    [entry] = health_report(s, "test", now=NOW)["daemons"]
    assert entry["resource"] == "nvidia.com/gpu"
    assert f"OK        daemon {PIPE} (pid 61): answering; 1 server(s); device plugin resource nvidia.com/gpu" \
        in render_text(health_report(s, "test", now=NOW))


def test_a_daemon_outside_the_device_plugins_root_has_no_resource_series():
    other = MpsDaemon("/run/nvidia-mps", "default", DaemonState.UP, "answering")
    assert "mps_control_resource_info" not in families(snapshot_of(mps_control=MpsControlData((other,), ("x",))))


# ---------------------------------------------------------------- an engine's active thread share


def test_an_engine_that_asks_nothing_gets_its_servers_thread_share():
    assert limits(daemon(), engine())[0] == (0.5, "server", "50% from server 2215")


def test_an_engines_own_lower_thread_percentage_applies():
    assert limits(daemon(), engine(atp="20"))[0] == (
        0.2, "client_env", "20% from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its environment (server 2215 allows 50%)")


def test_an_engine_cannot_raise_its_servers_thread_share_and_a_server_above_the_default_is_named():
    assert limits(daemon(server_atp=100.0), engine(atp="100"))[0] == (
        1.0, "server", "100% from server 2215, above the daemon's default of 50% for new servers "
        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100 in its environment cannot raise it)")


@pytest.mark.parametrize(("d", "e", "why"), [
    (daemon(server_atp=None), engine(), "unknown: server 2215's active thread percentage was not read"),
    (daemon(), engine(hidden=True), "unknown: its environment cannot be read (server 2215 allows 50%)"),
    (daemon(), engine(atp="half"), "unknown: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE='half' in its environment is not a percentage"),
])
def test_an_unknown_thread_share_has_no_series_and_status_says_why(d, e, why):
    s = snapshot(d, e)
    [joined] = s.derived.engines
    t = joined.active_thread_limit
    assert (t.value, t.source, t.detail) == (None, None, why)
    assert "mps_engine_active_thread_ratio" not in families(s)
    assert f"MPS active threads {why}" in health_report(s, "test", now=NOW)["engines"][0]["reason"]


def test_an_engine_that_is_no_client_of_a_watched_daemon_has_no_limits():
    [joined] = snapshot(daemon(clients=()), engine()).derived.engines
    assert (joined.active_thread_limit, joined.pinned_memory_limit) == (None, None)
    assert health_report(snapshot(daemon(clients=()), engine()), "test", now=NOW)["engines"][0]["active_thread_limit"] is None


# ---------------------------------------------------------------- an engine's pinned memory limit


def test_the_daemons_default_pinned_limit_applies_when_the_engine_asks_nothing():
    assert limits(daemon(), engine())[1] == (35 * GIB, "daemon_default", "35.0 GiB, the daemon's default for new servers")


@pytest.mark.parametrize("asked", ["0=20G", f"{GPU[:12]}=20G,0=40G", "0=20480MB,1=1G"])
def test_an_engines_own_lower_pinned_limit_for_its_gpu_applies(asked):
    assert limits(daemon(), engine(pinned=asked))[1] == (
        20 * GIB, "client_env", "20.0 GiB from CUDA_MPS_PINNED_DEVICE_MEM_LIMIT in its environment "
        "(the daemon's default allows 35.0 GiB)")


def test_an_engines_pinned_limit_above_the_daemons_default_is_ineffective():
    assert limits(daemon(), engine(pinned="0=60G"))[1][:2] == (35 * GIB, "daemon_default")


def test_an_engines_pinned_limit_applies_where_the_daemon_sets_none_and_neither_means_no_limit():
    assert limits(daemon(pinned=None), engine(pinned="0=20G"))[1] == (
        20 * GIB, "client_env", "20.0 GiB from CUDA_MPS_PINNED_DEVICE_MEM_LIMIT in its environment "
        "(the daemon's default sets none)")
    s = snapshot(daemon(pinned=None), engine(pinned="1=20G"))  # another device's limit
    assert s.derived.engines[0].pinned_memory_limit.detail == \
        "no limit: neither the daemon's default nor its environment sets one"
    assert "mps_engine_pinned_device_memory_limit_bytes" not in families(s)


@pytest.mark.parametrize(("d", "e", "starts", "why"), [
    (daemon(), engine(), logs(ServerStart(LOG, STARTED, LIMITS)),
     "unknown: server 2215 started before the daemon's limits were set (set_default_active_thread_percentage 50), "
     "so the daemon's default is not its own"),
    (daemon(server_atp=100.0), engine(), None,
     "unknown: server 2215 runs at 100% of the threads where the daemon's default is 50%, so it did not start with "
     "the daemon's current defaults"),
    (daemon(pinned=None, pinned_known=False), engine(), None,
     "unknown: the daemon's default pinned memory limit was not read"),
    (daemon(), engine(hidden=True), None, "unknown: its environment cannot be read"),
    (daemon(), engine(pinned="0=plenty"), None,
     "unknown: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT='0=plenty' in its environment is not understood"),
])
def test_an_unknown_pinned_limit_has_no_series_and_status_says_why(d, e, starts, why):
    s = snapshot(d, e, mps_logs=starts)
    assert s.derived.engines[0].pinned_memory_limit.detail == why
    assert "mps_engine_pinned_device_memory_limit_bytes" not in families(s)
    assert f"MPS pinned memory {why}" in health_report(s, "test", now=NOW)["engines"][0]["reason"]


def test_an_engines_limits_are_exported_in_base_units_with_their_source_and_shown_in_status():
    s = snapshot(daemon(), engine(atp="25"))
    f = families(s)
    assert f["mps_engine_active_thread_ratio"] == [({"engine": "qwen-a", "source": "client_env"}, 0.25)]
    assert f["mps_engine_pinned_device_memory_limit_bytes"] == [
        ({"engine": "qwen-a", "source": "daemon_default"}, float(35 * GIB))]
    [entry] = health_report(s, "test", now=NOW)["engines"]
    assert entry["active_thread_limit"] == {"ratio": 0.25, "source": "client_env", "detail": "25% from "
                                            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its environment (server 2215 allows 50%)"}
    assert entry["pinned_memory_limit"]["bytes"] == 35 * GIB
    assert entry["reason"].endswith("; MPS active threads 25% from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its environment "
                                    "(server 2215 allows 50%); MPS pinned memory 35.0 GiB, the daemon's default for new servers")


def test_an_engines_limits_come_from_its_first_process_that_is_a_client():
    # a tensor-parallel engine: its API server (1) holds no GPU context, its worker (2210) is the client
    assert limits(daemon(), engine(pids=(1, 2210)))[0][:2] == (0.5, "server")
