"""The GPU collector against a fake NVML replaying a real H200 recording (driver 580.159.04)."""

from __future__ import annotations

import time

import pytest
from mpswatch.analysis import health_report, render_text
from mpswatch.collectors import CollectorError
from mpswatch.collectors.gpu import GpuCollector
from mpswatch.exposition import render
from mpswatch.procfs import ProcFS
from mpswatch.scheduler import CollectorLoop, SnapshotStore

from tests.kit.fakenvml import NVML_ERROR_GPU_IS_LOST, NVML_ERROR_LIBRARY_NOT_FOUND, FakeNvml

UUID = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"


def collector(fake: FakeNvml, tmp_path, **kw) -> GpuCollector:
    (tmp_path / "proc").mkdir(exist_ok=True)  # other PID namespace: kinds come from NVML's process names
    made = GpuCollector(nvml_loader=lambda: fake, procfs=ProcFS(tmp_path / "proc"), xid_wait_ms=20, **kw)
    return made


def samples(snapshot_or_data, name):
    return {tuple(s.labels.items()): s.value for f in snapshot_or_data for s in f.samples if s.name == name}


def test_identity_and_coarse_values_come_from_the_recording(tmp_path):
    gpus = collector(FakeNvml(), tmp_path)
    try:
        data = gpus.collect()
    finally:
        gpus.close()
    assert data.driver_version == "580.159.04"
    [gpu] = data.gpus
    assert (gpu.index, gpu.uuid, gpu.name, gpu.compute_mode) == (0, UUID, "NVIDIA H200", "Default")
    assert gpu.utilization_ratio == 0.99 and gpu.power_watts == 541.232 and gpu.temperature_celsius == 53
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (3313958912, 150754820096)


def test_gpm_is_computed_between_the_previous_cycle_s_sample_and_this_one_s(tmp_path):
    fake = FakeNvml()
    gpus = collector(fake, tmp_path)
    try:
        first = gpus.collect().gpus[0]
        second = gpus.collect().gpus[0]
        third = gpus.collect().gpus[0]
    finally:
        gpus.close()
    assert first.gpm_supported and first.sm_active_ratio is None  # one sample: nothing to compare yet
    assert second.sm_active_ratio == pytest.approx(0.8781559374195452)
    assert second.sm_occupancy_ratio == pytest.approx(0.09620554445094589)
    assert second.dram_bandwidth_ratio == pytest.approx(0.039348272433826192)
    assert second.tensor_active_ratio == pytest.approx(0.00015354382595789286)
    assert third.sm_active_ratio == second.sm_active_ratio
    assert fake.metric_pairs == [(1, 2), (2, 3)]
    assert fake.freed == {1, 2, 3}  # every sample freed, the last one at close


def test_a_gpu_without_gpm_has_no_gpm_series_and_status_says_so(tmp_path):
    gpus = collector(FakeNvml(gpm_supported=False), tmp_path)
    try:
        gpus.collect()
        data = gpus.collect()
    finally:
        gpus.close()
    gpu = data.gpus[0]
    assert gpu.gpm_supported is False and gpu.sm_active_ratio is None and gpu.utilization_ratio == 0.99
    store = SnapshotStore()
    store.publish(_report(data))
    exported = render(store.current(), "test")
    assert samples(exported, "mps_gpu_sm_active_ratio") == {}
    assert samples(exported, "mps_gpu_gpm_supported") == {(("gpu_uuid", UUID),): 0.0}
    assert "no GPM on this GPU: coarse utilisation only" in render_text(health_report(store.current(), "test"))


def _report(data):
    from mpswatch.snapshot import CollectorReport, CollectorStatus, frozen_map

    return CollectorReport(CollectorStatus("gpu", True, 0.01, time.time(), frozen_map()), data)


def test_processes_are_told_apart_as_mps_clients_server_and_exclusive(tmp_path):
    gpus = collector(FakeNvml(), tmp_path)
    try:
        processes = gpus.collect().gpus[0].processes
    finally:
        gpus.close()
    assert [(p.pid, p.kind, p.memory_bytes) for p in processes] == [
        (429, "mps_client", 809500672),
        (430, "mps_client", 1010827264),
        (431, "exclusive", 763363328),
        (481, "mps_server", 69206016),
    ]


def test_a_lost_gpu_costs_only_its_own_series(tmp_path):
    fake = FakeNvml(gpus=2)
    gpus = collector(fake, tmp_path)
    try:
        gpus.collect()
        fake.failing[1] = NVML_ERROR_GPU_IS_LOST
        data = gpus.collect()
    finally:
        gpus.close()
    good, lost = data.gpus
    assert good.up and good.utilization_ratio == 0.99
    assert not lost.up and "GPU is lost" in lost.error and lost.uuid.endswith("01")
    store = SnapshotStore()
    store.publish(_report(data))
    exported = render(store.current(), "test")
    assert {dict(k)["gpu_uuid"] for k in samples(exported, "mps_gpu_utilization_ratio")} == {good.uuid}
    assert samples(exported, "mps_gpu_up") == {
        (("gpu_uuid", good.uuid),): 1.0, (("gpu_uuid", lost.uuid),): 0.0,
    }
    report = health_report(store.current(), "test")
    assert [g["verdict"] for g in report["gpus"]] == ["DEGRADED", "DOWN"]


def test_nvml_that_cannot_initialise_is_a_clear_failure_not_a_crash(tmp_path):
    gpus = collector(FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND), tmp_path)
    with pytest.raises(CollectorError) as raised:
        gpus.collect()
    assert raised.value.reason == "nvml_unavailable" and "no NVIDIA driver" in raised.value.detail


def test_a_hanging_call_marks_the_collector_stale_drops_its_series_and_it_recovers(tmp_path):
    fake = FakeNvml()
    gpus = collector(fake, tmp_path, deadline_seconds=0.3)
    store = SnapshotStore()
    loop = CollectorLoop(gpus, store)
    try:
        assert loop.cycle().status.success
        fake.hang_in = "nvmlDeviceGetPowerUsage"
        started = time.monotonic()
        report = loop.cycle()
        assert time.monotonic() - started < 1.0
        assert not report.status.success and report.status.error_reason == "timeout"
        exported = render(store.current(), "test")
        assert samples(exported, "mps_gpu_utilization_ratio") == {}
        assert samples(exported, "mps_exporter_collector_success") == {(("collector", "gpu"),): 0.0}
        assert not loop.cycle().status.success  # still stuck: no second call piles up
        fake.hang_in = None
        fake.release.set()
        time.sleep(0.1)
        report = loop.cycle()
        assert report.status.success and report.data.gpus[0].utilization_ratio == 0.99
    finally:
        fake.release.set()
        gpus.close()


def test_an_xid_event_is_counted_per_gpu_and_code_and_explained(tmp_path):
    fake = FakeNvml(gpus=2)
    gpus = collector(fake, tmp_path)
    try:
        gpus.collect()
        fake.xids.put((0, 31))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = gpus.collect()
            if data.gpus[0].xid_counts.get(31):
                break
            time.sleep(0.02)
    finally:
        gpus.close()
    assert data.gpus[0].xid_counts[31] == 1 and data.gpus[1].xid_counts[31] == 0
    assert [(e.uuid, e.xid) for e in data.recent_xids] == [(UUID, 31)]
    store = SnapshotStore()
    store.publish(_report(data))
    text = render_text(health_report(store.current(), "test"))
    assert "XID 31, GPU memory page fault (an application's illegal address)" in text
    exported = render(store.current(), "test")
    assert samples(exported, "mps_gpu_xid_errors_total")[(("gpu_uuid", UUID), ("xid", "31"))] == 1
    assert samples(exported, "mps_gpu_xid_errors_total")[(("gpu_uuid", UUID), ("xid", "79"))] == 0


def wait_for_xid(gpus, index, xid):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = gpus.collect()
        if data.gpus[index].xid_counts.get(xid):
            return data
        time.sleep(0.02)
    raise AssertionError("XID not counted")


def test_an_xid_from_a_gpu_that_fell_off_the_bus_is_counted_on_that_gpu(tmp_path):
    fake = FakeNvml(gpus=2)
    gpus = collector(fake, tmp_path)
    try:
        gpus.collect()
        fake.failing[1] = NVML_ERROR_GPU_IS_LOST  # its handle can no longer be asked for its UUID
        fake.xids.put((1, 79))
        data = wait_for_xid(gpus, 1, 79)
    finally:
        gpus.close()
    assert not data.gpus[1].up and data.gpus[1].xid_counts[79] == 1 and data.gpus[0].xid_counts[79] == 0


def test_a_gpu_whose_handle_fails_at_start_is_down_alone_and_xids_are_still_watched(tmp_path):
    fake = FakeNvml(gpus=2)
    fake.failing[1] = 4  # NVML_ERROR_NO_PERMISSION: a GPU hidden from this container
    gpus = collector(fake, tmp_path)
    try:
        data = gpus.collect()
        assert data.gpus[0].up and not data.gpus[1].up
        fake.xids.put((0, 31))
        assert wait_for_xid(gpus, 0, 31).gpus[0].xid_counts[31] == 1
    finally:
        gpus.close()


def test_gpm_samples_refused_in_practice_turn_gpm_off_without_failing(tmp_path):
    fake = FakeNvml()
    fake.gpm_sample_refused = True
    gpus = collector(fake, tmp_path)
    try:
        gpus.collect()
        gpu = gpus.collect().gpus[0]
    finally:
        gpus.close()
    assert gpu.up and gpu.gpm_supported is False and gpu.sm_active_ratio is None and gpu.utilization_ratio == 0.99
    assert fake.freed == set(range(1, fake.allocated + 1))


def test_a_driver_level_error_starts_nvml_over(tmp_path):
    fake = FakeNvml()
    gpus = collector(fake, tmp_path)
    try:
        gpus.collect()
        fake.failing[0] = 1  # NVML_ERROR_UNINITIALIZED
        with pytest.raises(CollectorError) as raised:
            gpus.collect()
        assert raised.value.reason == "nvml_error" and not fake.initialised
        del fake.failing[0]
        assert gpus.collect().gpus[0].up and fake.initialised
    finally:
        gpus.close()


def test_without_the_mps_process_list_clients_are_unknown_not_accused(tmp_path):
    fake = FakeNvml()
    fake.mps_list_error = 3  # NVML_ERROR_NOT_SUPPORTED
    gpus = collector(fake, tmp_path)
    try:
        data = gpus.collect()
    finally:
        gpus.close()
    assert {p.pid: p.kind for p in data.gpus[0].processes} == {
        429: "unknown", 430: "unknown", 431: "unknown", 481: "mps_server"}
    store = SnapshotStore()
    store.publish(_report(data))
    assert health_report(store.current(), "test")["gpus"][0]["verdict"] == "OK"
