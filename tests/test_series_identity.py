"""Series named by what lasts (issue 20): a GPU by `gpu_uuid` alone, an MPS server by (pipe_dir, uid),
GPU memory by process kind and by engine; PIDs only on `_info` series, so that a restart makes no
new series."""

from __future__ import annotations

from mpswatch.exposition import render
from mpswatch.snapshot import (
    DaemonState,
    EnginesData,
    EngineState,
    GpuData,
    GpuProcess,
    GpuState,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsServer,
    frozen_map,
)

from tests.kit.snapshots import snapshot_of

PIPE = "/tmp/mps/pipe"
GPU = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"
INFO_FAMILIES_WITH_PIDS = {"mps_control_info", "mps_server_info", "mps_client_info", "mps_pod_info",
                           "mps_fault_blamed_client_info"}


def daemon(*servers: MpsServer, clients: tuple[MpsClient, ...] = ()) -> MpsDaemon:
    return MpsDaemon(PIPE, "configured", DaemonState.UP, "answering", pid=61, servers=servers, clients=clients,
                     default_active_thread_percentage=50.0)


def client(pid: int, server_pid: int) -> MpsClient:
    return MpsClient(pid, 0, server_pid, GPU, "4026531836", "python3")


def exported(**data) -> dict[str, dict[frozenset, float]]:
    families: dict[str, dict[frozenset, float]] = {}
    for family in render(snapshot_of(**data), "test"):
        for sample in family.samples:
            families.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return families


def server_series(families) -> dict[str, dict[frozenset, float]]:
    return {name: series for name, series in families.items() if name.startswith("mps_server_") and name != "mps_server_info"}


def test_a_restarted_server_continues_its_series_and_only_its_info_names_the_new_pid():
    before = exported(mps_control=MpsControlData((daemon(MpsServer(476, 0, "ACTIVE", 50.0),
                                                        clients=(client(437, 476),)),), (PIPE,)))
    after = exported(mps_control=MpsControlData((daemon(MpsServer(9120, 0, "ACTIVE", 50.0),
                                                       clients=(client(9130, 9120),)),), (PIPE,)))
    assert {n: set(s) for n, s in server_series(before).items()} == {n: set(s) for n, s in server_series(after).items()}
    assert set(before["mps_clients"]) == set(after["mps_clients"])
    assert before["mps_server_status"][frozenset({("pipe_dir", PIPE), ("uid", "0"), ("status", "ACTIVE")})] == 1
    assert before["mps_server_active_thread_ratio"] == {frozenset({("pipe_dir", PIPE), ("uid", "0")}): 0.5}
    assert before["mps_default_active_thread_ratio"] == {frozenset({("pipe_dir", PIPE)}): 0.5}
    assert [dict(labels)["server_pid"] for labels in after["mps_server_info"]] == ["9120"]


def test_servers_sharing_a_uid_show_as_one_with_the_worst_status_and_all_their_clients():
    old, new = MpsServer(476, None, "FAULT", 100.0), MpsServer(9120, None, "ACTIVE", 25.0)
    families = exported(mps_control=MpsControlData(
        (daemon(old, new, clients=(client(437, 476), client(9130, 9120))),), (PIPE,)))
    statuses = {dict(labels)["status"]: value for labels, value in families["mps_server_status"].items()}
    assert statuses == {"INITIALIZING": 0, "ACTIVE": 0, "FAULT": 1}
    assert families["mps_server_active_thread_ratio"] == {frozenset({("pipe_dir", PIPE), ("uid", "")}): 0.25}
    assert families["mps_server_clients"] == {frozenset({("pipe_dir", PIPE), ("uid", "")}): 2}
    assert families["mps_clients"] == {frozenset({("pipe_dir", PIPE), ("uid", ""), ("gpu_uuid", GPU)}): 2}
    assert len(families["mps_server_info"]) == 2


def test_gpu_series_are_named_by_gpu_uuid_and_memory_by_kind_and_engine_not_by_pid():
    gpu = GpuState(index=3, uuid=GPU, name="NVIDIA H200", up=True, memory_used_bytes=7 * 2**30, processes=(
        GpuProcess(40, "mps_server", 2**29), GpuProcess(41, "mps_client", 2**30), GpuProcess(42, "mps_client", 2**31),
        GpuProcess(43, "exclusive", 2**28)))
    lost = GpuState(index=4, uuid=None, name=None, up=False)
    engine = EngineState("qwen-a", "http://127.0.0.1:8000/metrics", "configured", True, gpu_uuid=GPU, pids=(41, 42))
    families = exported(gpu=GpuData("580.159.04", (gpu, lost)), engines=EnginesData((engine,), frozen_map()))
    for name, series in families.items():
        for labels in series:
            keys = {key for key, _ in labels}
            assert "uuid" not in keys, name
            assert not keys & {"pid", "server_pid"} or name in INFO_FAMILIES_WITH_PIDS, name
            assert "gpu" not in keys or name == "mps_gpu_info", name
    assert families["mps_gpu_memory_used_bytes"] == {frozenset({("gpu_uuid", GPU)}): 7 * 2**30}
    assert [dict(labels)["gpu"] for labels in families["mps_gpu_info"]] == ["3"]
    assert families["mps_gpu_memory_by_kind_bytes"] == {
        frozenset({("gpu_uuid", GPU), ("kind", "mps_server")}): 2**29,
        frozenset({("gpu_uuid", GPU), ("kind", "mps_client")}): 3 * 2**30,
        frozenset({("gpu_uuid", GPU), ("kind", "exclusive")}): 2**28,
    }
    assert families["mps_engine_gpu_memory_bytes"] == {frozenset({("engine", "qwen-a"), ("gpu_uuid", GPU)}): 3 * 2**30}
    assert families["mps_gpus_without_uuid"] == {frozenset(): 1}
    assert "mps_gpu_process_memory_bytes" not in families
