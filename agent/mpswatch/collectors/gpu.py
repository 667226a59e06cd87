"""GPU collector: NVML utilisation, GPM activity, per-process memory by MPS role, XID errors.

NVML calls run in-process and cannot be killed; the scheduler gives this collector a deadline
and reports it stale when a call hangs. XID events are waited for on their own thread with a
short timeout, so a stuck wait never holds up a cycle. The NVML module is injected (tests use a
fake replaying a real H200 recording).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from mpswatch.collectors import CollectorError, CollectorUnit
from mpswatch.metrics import Families
from mpswatch.procfs import ProcFS
from mpswatch.snapshot import DerivedFacts, GpuData, GpuProcess, GpuState, XidEvent, frozen_map
from mpswatch.verdicts import DEGRADED, DOWN, OK, RECENT_EVENTS_SHOWN, StatusSection, iso_time, percent, problem

MPS_SERVER_PROGRAM = "nvidia-cuda-mps-server"
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
XID_MEANINGS = {
    13: "graphics engine exception (an application error)",
    31: "GPU memory page fault (an application's illegal address)",
    43: "GPU stopped processing (an application error)",
    45: "preemptive cleanup after an earlier error (expected on co-located MPS clients)",
    48: "double-bit ECC error (GPU reset needed)",
    63: "ECC page retirement or row remap recorded",
    64: "ECC page retirement or row remap failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    94: "contained ECC error (restart the affected application)",
    95: "uncontained ECC error (GPU reset needed)",
    109: "context switch timeout",
    119: "GSP RPC timeout (reset or power cycle)",
    120: "GSP error (reset or power cycle)",
}
# NVML errors that mean "this value is not available here", not "this GPU is broken"
_ABSENT = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_NOT_FOUND", "NVML_ERROR_NO_DATA")
_REINIT = ("NVML_ERROR_UNINITIALIZED", "NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_LIB_RM_VERSION_MISMATCH")


def nvml_loader(spec: str = "pynvml") -> Callable[[], Any]:
    """`module` or `module:factory`: the NVML binding to use (a fake one in tests)."""

    def load() -> Any:
        module_name, _, factory = spec.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, factory)() if factory else module

    return load


NVIDIA_ML_PY = nvml_loader()


def gpm_ratio(percent: float) -> float:
    return min(1.0, max(0.0, percent / 100.0))


class _GpuFailed(Exception):
    pass


def handle_key(handle: Any) -> int:
    """NVML device handles are ctypes pointers, which compare equal only to themselves: the
    address tells two pointers to the same device apart from two devices."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value or id(handle)
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


@dataclass
class _DeviceMemory:
    """What stays known about a GPU between cycles: identity, GPM support and the last sample."""

    handle: Any
    uuid: str | None = None
    name: str | None = None
    gpm_supported: bool | None = None
    gpm_sample: Any = None
    gpm_sampled_at: float = 0.0


class _XidWatcher(threading.Thread):
    """Waits for XID events; counts them per GPU and code, keeps the latest ones."""

    def __init__(self, nvml: Any, handles: list[tuple[Any, str | None]], wait_ms: int, log: Any,
                 counts: dict[str, dict[int, int]] | None = None) -> None:
        super().__init__(name="xid-events", daemon=True)
        self._nvml = nvml
        self._handles = [handle for handle, _ in handles]
        self._uuids = {handle_key(handle): uuid for handle, uuid in handles}  # read when NVML was set up
        self._wait_ms = wait_ms
        self._log = log
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.counts: dict[str, dict[int, int]] = counts or {}  # carried over a re-initialisation
        self.recent: deque[XidEvent] = deque(maxlen=50)
        self.note: str | None = None

    def register(self, event_set: Any, handles: list[Any]) -> int:
        registered = 0
        for handle in handles:
            try:
                self._nvml.nvmlDeviceRegisterEvents(handle, self._nvml.nvmlEventTypeXidCriticalError, event_set)
                registered += 1
            except self._nvml.NVMLError as err:
                self.note = f"XID events not available on a GPU: {err}"
        return registered

    def run(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:
            self.note = f"XID events unavailable: {err}"
            return
        try:
            if self.register(event_set, self._handles):
                self._wait_loop(event_set)
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except Exception:
                pass

    def _wait_loop(self, event_set: Any) -> None:
        nvml = self._nvml
        failures = 0
        while not self._stop_event.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, self._wait_ms)
                self._record(data)
                failures = 0
            except nvml.NVMLError as err:
                if getattr(err, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                    continue
                failures += 1
                if failures == 1:
                    self._log.warning("xid_wait_failed", error=str(err))
                if failures == 3:
                    self.note = f"XID events are failing: {err}"
                self._stop_event.wait(min(30.0, failures))  # back off; never spin on a broken event set
            except Exception as err:  # a surprise must not end the only XID watcher quietly
                self._log.error("xid_watcher_error", error=repr(err))
                self._stop_event.wait(1.0)

    def _record(self, data: Any) -> None:
        uuid = self._uuids.get(handle_key(data.device)) or "unknown"
        xid = int(data.eventData)
        event = XidEvent(time=time.time(), uuid=uuid, xid=xid)
        with self._lock:
            per_gpu = self.counts.setdefault(uuid, dict.fromkeys(XID_MEANINGS, 0))
            per_gpu[xid] = per_gpu.get(xid, 0) + 1
            self.recent.append(event)
        self._log.warning("gpu_xid", uuid=uuid, xid=xid, meaning=XID_MEANINGS.get(xid, "see NVIDIA's XID catalog"))

    def snapshot(self) -> tuple[dict[str, dict[int, int]], tuple[XidEvent, ...]]:
        with self._lock:
            return {uuid: dict(counts) for uuid, counts in self.counts.items()}, tuple(self.recent)

    def stop(self, wait_seconds: float) -> None:
        self._stop_event.set()
        self.join(wait_seconds)


class GpuCollector:
    name = "gpu"

    def __init__(
        self,
        *,
        nvml_loader: Callable[[], Any] = NVIDIA_ML_PY,
        interval_seconds: float = 2.0,
        deadline_seconds: float = 5.0,
        procfs: ProcFS | None = None,
        xid_wait_ms: int = 500,
    ) -> None:
        self.interval_seconds = interval_seconds
        self.deadline_seconds = deadline_seconds
        self._load_nvml = nvml_loader
        self._procfs = procfs or ProcFS()
        self._xid_wait_ms = xid_wait_ms
        self._nvml: Any = None
        self._devices: dict[int, _DeviceMemory] = {}
        self._xids: _XidWatcher | None = None
        self._xid_counts: dict[str, dict[int, int]] = {}
        self._driver: str | None = None
        self._failing: dict[int, str] = {}
        self._log = structlog.get_logger().bind(collector=self.name)

    def collect(self) -> GpuData:
        nvml = self._initialised()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as err:
            self._reinit_if_needed(err)
            raise CollectorError("nvml_error", f"nvmlDeviceGetCount: {err}") from None
        gpus = tuple(self._device(nvml, index) for index in range(count))
        counts, recent = self._xids.snapshot() if self._xids else ({}, ())
        gpus = tuple(g if g.uuid is None else _with_xids(g, counts.get(g.uuid)) for g in gpus)
        notes = [self._xids.note] if self._xids and self._xids.note else []
        unnamed = sum(counts.get("unknown", {}).values())
        if unnamed:
            notes.append(f"{unnamed} XID event(s) from a GPU NVML could not name")
        return GpuData(driver_version=self._driver, gpus=gpus, recent_xids=recent, notes=tuple(notes))

    def _initialised(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        try:
            nvml = self._load_nvml()
        except (ImportError, AttributeError) as err:
            raise CollectorError("nvml_unavailable", f"cannot load the NVML binding: {err}") from None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise CollectorError("nvml_unavailable", f"NVML did not initialise: {err} (no NVIDIA driver here?)") from None
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
            handles: list[tuple[Any, str | None]] = []
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                except nvml.NVMLError as err:  # that GPU fails on its own, each cycle, until it answers
                    self._log.warning("gpu_handle_failed", gpu=index, error=str(err))
                    continue
                memory = self._devices[index] = _DeviceMemory(handle=handle)
                try:
                    memory.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                    memory.name = _text(nvml.nvmlDeviceGetName(handle))
                except nvml.NVMLError:
                    pass
                handles.append((handle, memory.uuid))
        except nvml.NVMLError as err:
            self._devices.clear()
            try:
                nvml.nvmlShutdown()  # NVML counts inits: never leave one behind
            except nvml.NVMLError:
                pass
            raise CollectorError("nvml_error", f"NVML setup failed: {err}") from None
        self._driver = _text(driver)
        self._nvml = nvml
        self._log.info("nvml_initialised", driver_version=self._driver, gpus=len(handles))
        self._xids = _XidWatcher(nvml, handles, self._xid_wait_ms, self._log, self._xid_counts)
        self._xids.start()
        return nvml

    def _reinit_if_needed(self, err: Any) -> None:
        if _error_name(self._nvml, err) in _REINIT:
            self._log.warning("nvml_reinitialising", error=str(err))
            self.close()

    def _device(self, nvml: Any, index: int) -> GpuState:
        memory = self._devices.get(index)
        try:
            if memory is None:
                handle = self._call(nvml.nvmlDeviceGetHandleByIndex, index)
                if handle is None:
                    raise _GpuFailed("nvmlDeviceGetHandleByIndex: not available")
                memory = self._devices[index] = _DeviceMemory(handle=handle)
            state = self._read_device(nvml, index, memory)
        except _GpuFailed as failed:
            reason = str(failed)
            if self._failing.get(index) != reason:
                self._log.warning("gpu_failed", gpu=index, uuid=memory.uuid if memory else None, error=reason)
            self._failing[index] = reason
            if memory is not None and "GPU is lost" in reason:
                self._forget_device(index)  # after a reset the GPU needs a new handle
            return GpuState(index=index, uuid=memory.uuid if memory else None, name=memory.name if memory else None,
                            up=False, error=reason)
        if self._failing.pop(index, None) is not None:
            self._log.info("gpu_recovered", gpu=index, uuid=memory.uuid)
        return state

    def _forget_device(self, index: int) -> None:
        memory = self._devices.get(index)
        if memory is not None and memory.uuid is not None:
            self._devices[index] = _DeviceMemory(handle=None, uuid=memory.uuid, name=memory.name)
        self._free_sample(self._nvml, memory)
        if memory is not None and memory.uuid is None:
            self._devices.pop(index, None)

    @staticmethod
    def _free_sample(nvml: Any, memory: _DeviceMemory | None) -> None:
        if memory is not None and memory.gpm_sample is not None:
            try:
                nvml.nvmlGpmSampleFree(memory.gpm_sample)
            except Exception:
                pass
            memory.gpm_sample = None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The value, None when NVML says it is not available here; a driver-level error starts
        NVML over; anything else fails this GPU only."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as err:
            name = _error_name(self._nvml, err)
            if name in _ABSENT:
                return None
            if name in _REINIT:
                self._reinit_if_needed(err)
                raise CollectorError("nvml_error", f"{getattr(fn, '__name__', 'nvml')}: {err}") from None
            raise _GpuFailed(f"{getattr(fn, '__name__', 'nvml')}: {err}") from None

    def _read_device(self, nvml: Any, index: int, memory: _DeviceMemory) -> GpuState:
        if memory.handle is None:
            handle = self._call(nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                raise _GpuFailed("nvmlDeviceGetHandleByIndex: not available")
            memory.handle = handle
        handle = memory.handle
        if memory.uuid is None:
            memory.uuid = _text(self._call(nvml.nvmlDeviceGetUUID, handle))
            memory.name = _text(self._call(nvml.nvmlDeviceGetName, handle))
        mode = self._call(nvml.nvmlDeviceGetComputeMode, handle)
        util = self._call(nvml.nvmlDeviceGetUtilizationRates, handle)
        mem = self._call(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._call(nvml.nvmlDeviceGetPowerUsage, handle)
        temperature = self._call(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        gpm = self._gpm(nvml, memory)
        return GpuState(
            index=index,
            uuid=memory.uuid,
            name=memory.name,
            up=True,
            compute_mode=COMPUTE_MODES.get(mode, str(mode)) if mode is not None else None,
            utilization_ratio=util.gpu / 100.0 if util is not None else None,
            memory_used_bytes=mem.used if mem is not None else None,
            memory_total_bytes=mem.total if mem is not None else None,
            power_watts=power_mw / 1000.0 if power_mw is not None else None,
            temperature_celsius=float(temperature) if temperature is not None else None,
            gpm_supported=memory.gpm_supported,
            processes=self._processes(nvml, handle),
            sm_active_ratio=gpm["sm_active_ratio"],
            sm_occupancy_ratio=gpm["sm_occupancy_ratio"],
            dram_bandwidth_ratio=gpm["dram_bandwidth_ratio"],
            tensor_active_ratio=gpm["tensor_active_ratio"],
        )

    def _gpm(self, nvml: Any, memory: _DeviceMemory) -> dict[str, float | None]:
        """GPM between the previous cycle's sample and this one's: nothing on the first cycle,
        nor when the previous sample is older than three intervals (after an outage)."""
        values: dict[str, float | None] = dict.fromkeys(
            ("sm_active_ratio", "sm_occupancy_ratio", "dram_bandwidth_ratio", "tensor_active_ratio")
        )
        if memory.gpm_supported is None:
            support = self._call(nvml.nvmlGpmQueryDeviceSupport, memory.handle)
            memory.gpm_supported = bool(support is not None and support.isSupportedDevice)
        if not memory.gpm_supported:
            return values
        metric_ids = {
            "sm_active_ratio": nvml.NVML_GPM_METRIC_SM_UTIL,
            "sm_occupancy_ratio": nvml.NVML_GPM_METRIC_SM_OCCUPANCY,
            "dram_bandwidth_ratio": nvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
            "tensor_active_ratio": nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
        }
        sample = self._call(nvml.nvmlGpmSampleAlloc)
        if sample is None:
            return values
        try:
            taken = self._call(nvml.nvmlGpmSampleGet, memory.handle, sample)
        except (_GpuFailed, CollectorError):
            nvml.nvmlGpmSampleFree(sample)
            raise
        if taken is None:  # supported on paper, refused in practice (MIG, permissions)
            nvml.nvmlGpmSampleFree(sample)
            memory.gpm_supported = False
            self._free_sample(nvml, memory)
            return values
        now = time.monotonic()
        previous, previous_at = memory.gpm_sample, memory.gpm_sampled_at
        memory.gpm_sample, memory.gpm_sampled_at = sample, now
        if previous is None:
            return values
        try:
            if now - previous_at > 3 * self.interval_seconds:
                return values  # spans an outage: not "the last interval"
            query = nvml.c_nvmlGpmMetricsGet_t()
            query.version = nvml.NVML_GPM_METRICS_GET_VERSION
            query.numMetrics = len(metric_ids)
            query.sample1, query.sample2 = previous, sample
            for i, metric_id in enumerate(metric_ids.values()):
                query.metrics[i].metricId = metric_id
            if self._call(nvml.nvmlGpmMetricsGet, query) is not None:
                for i, key in enumerate(metric_ids):
                    if query.metrics[i].nvmlReturn == 0:
                        values[key] = gpm_ratio(query.metrics[i].value)
        finally:
            try:
                nvml.nvmlGpmSampleFree(previous)
            except nvml.NVMLError:
                pass
        return values

    def _processes(self, nvml: Any, handle: Any) -> tuple[GpuProcess, ...] | None:
        compute = self._call(nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if compute is None:
            return None
        mps = self._call(nvml.nvmlDeviceGetMPSComputeRunningProcesses, handle)
        mps_memory = {p.pid: p.usedGpuMemory for p in mps or []}
        processes = []
        for proc in compute:
            if proc.pid in mps_memory:
                kind, used = "mps_client", mps_memory.pop(proc.pid)
            elif self._is_mps_server(nvml, proc.pid):
                kind, used = "mps_server", proc.usedGpuMemory
            else:  # without the MPS list, a client cannot be told from a process running alone
                kind, used = ("exclusive" if mps is not None else "unknown"), proc.usedGpuMemory
            processes.append(GpuProcess(pid=proc.pid, kind=kind, memory_bytes=used))
        processes += [GpuProcess(pid=pid, kind="mps_client", memory_bytes=used) for pid, used in mps_memory.items()]
        return tuple(sorted(processes, key=lambda p: p.pid))

    def _is_mps_server(self, nvml: Any, pid: int) -> bool:
        argv = self._procfs.cmdline(pid)
        if argv:
            return os.path.basename(argv[0]) == MPS_SERVER_PROGRAM
        try:  # another PID namespace: ask NVML
            return os.path.basename(_text(nvml.nvmlSystemGetProcessName(pid)) or "") == MPS_SERVER_PROGRAM
        except nvml.NVMLError:
            return False

    def close(self) -> None:
        if self._xids is not None:
            self._xids.stop(wait_seconds=2 * self._xid_wait_ms / 1000 + 0.5)
            self._xid_counts = self._xids.snapshot()[0]
            self._xids = None
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        for memory in self._devices.values():
            self._free_sample(nvml, memory)
        self._devices.clear()
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _error_name(nvml: Any, err: Any) -> str:
    code = getattr(err, "value", None)
    for name in (*_ABSENT, *_REINIT):
        if getattr(nvml, name, object()) == code:
            return name
    return str(code)


def _with_xids(gpu: GpuState, counts: dict[int, int] | None) -> GpuState:
    """The common XIDs start at 0, so that the first one is an increase Prometheus can see."""
    return replace(gpu, xid_counts=frozen_map(counts or dict.fromkeys(XID_MEANINGS, 0)))


# ---------------------------------------------------------------- metrics and status

_GPU_VALUES = {
    "mps_gpu_sm_active_ratio": "sm_active_ratio",
    "mps_gpu_sm_occupancy_ratio": "sm_occupancy_ratio",
    "mps_gpu_dram_bandwidth_ratio": "dram_bandwidth_ratio",
    "mps_gpu_tensor_active_ratio": "tensor_active_ratio",
    "mps_gpu_utilization_ratio": "utilization_ratio",
    "mps_gpu_memory_used_bytes": "memory_used_bytes",
    "mps_gpu_memory_total_bytes": "memory_total_bytes",
    "mps_gpu_power_watts": "power_watts",
    "mps_gpu_temperature_celsius": "temperature_celsius",
}


def render(data: GpuData, facts: DerivedFacts, out: Families) -> None:
    """Each GPU's series are named by its UUID alone (its index and other facts are on mps_gpu_info);
    a GPU whose UUID NVML never gave is only counted."""
    out.add("mps_gpus_without_uuid", [], sum(1 for gpu in data.gpus if gpu.uuid is None))
    for gpu in data.gpus:
        if gpu.uuid is None:
            continue
        ids = [gpu.uuid]
        out.add("mps_gpu_up", ids, 1 if gpu.up else 0)
        out.add("mps_gpu_info", [gpu.index, gpu.uuid, gpu.name or "", data.driver_version or "", gpu.compute_mode or ""], 1)
        for xid, count in sorted(gpu.xid_counts.items()):
            out.add("mps_gpu_xid_errors_total", [*ids, xid], count)
        if not gpu.up:
            continue
        if gpu.gpm_supported is not None:
            out.add("mps_gpu_gpm_supported", ids, 1 if gpu.gpm_supported else 0)
        for metric, attribute in _GPU_VALUES.items():
            value = getattr(gpu, attribute)
            if value is not None:
                out.add(metric, ids, value)
        _render_process_memory(gpu.uuid, gpu.processes or (), facts, out)


def _render_process_memory(uuid: str, processes: Iterable[GpuProcess], facts: DerivedFacts, out: Families) -> None:
    """Memory by process kind and by engine, not by PID: a PID label makes new series at every restart."""
    by_kind: dict[str, int] = {}
    by_engine: dict[str, int] = {}
    for process in processes:
        if process.memory_bytes is None:
            continue
        by_kind[process.kind] = by_kind.get(process.kind, 0) + process.memory_bytes
        engine = facts.engine_of_pid.get(process.pid)
        if engine is not None:
            by_engine[engine] = by_engine.get(engine, 0) + process.memory_bytes
    for kind, memory in sorted(by_kind.items()):
        out.add("mps_gpu_memory_by_kind_bytes", [uuid, kind], memory)
    for engine, memory in sorted(by_engine.items()):
        out.add("mps_engine_gpu_memory_bytes", [engine, uuid], memory)


def status(data: GpuData, facts: DerivedFacts, now: float) -> StatusSection:
    gpus = [_gpu_entry(g, now, data.recent_xids) for g in data.gpus]
    problems = tuple(problem(g["verdict"], "gpu", f"gpu {g['index']} {g['name'] or ''} ({g['uuid']})", g["reason"])
                     for g in gpus if g["verdict"] != OK)
    first_cycle = any(g.up and g.gpm_supported and g.sm_active_ratio is None for g in data.gpus)
    return StatusSection({"gpus": gpus}, problems, data.notes, needs_two_samples=("GPM activity",) if first_cycle else ())


def _gpu_entry(gpu: GpuState, now: float, recent_xids: tuple[XidEvent, ...]) -> dict[str, Any]:
    processes = [{"pid": p.pid, "kind": p.kind, "memory_bytes": p.memory_bytes} for p in gpu.processes or ()]
    servers = [p["pid"] for p in processes if p["kind"] == "mps_server"]
    alone = [p["pid"] for p in processes if p["kind"] == "exclusive"]
    kinds = {kind: sum(1 for p in processes if p["kind"] == kind) for kind in ("mps_client", "mps_server", "exclusive")}
    if not gpu.gpm_supported:
        activity = "no GPM on this GPU: coarse utilisation only"
    else:
        activity = f"SM active {percent(gpu.sm_active_ratio)}, DRAM bandwidth {percent(gpu.dram_bandwidth_ratio)}"
    used = f"{(gpu.memory_used_bytes or 0) / 2**30:.1f}/{(gpu.memory_total_bytes or 0) / 2**30:.0f} GiB"
    summary = (f"utilisation {percent(gpu.utilization_ratio)}, {activity}, memory {used}; "
               f"{kinds['mps_client']} MPS client(s), {kinds['mps_server']} server(s), {kinds['exclusive']} without MPS")
    if not gpu.up:
        verdict, reason = DOWN, f"NVML calls fail: {gpu.error}"
    elif servers and alone:
        verdict = DEGRADED
        reason = (f"process(es) {', '.join(map(str, alone))} run on this GPU without MPS while MPS server "
                  f"{servers[0]} serves it; {summary}")
    else:
        verdict, reason = OK, summary
    xids = [
        {"xid": e.xid, "meaning": XID_MEANINGS.get(e.xid, "see NVIDIA's XID catalog"),
         "time": iso_time(e.time), "age_seconds": round(now - e.time, 1)}
        for e in reversed(recent_xids) if e.uuid == gpu.uuid
    ][:RECENT_EVENTS_SHOWN]
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "gpm_supported": gpu.gpm_supported,
        "utilization_ratio": gpu.utilization_ratio,
        "sm_active_ratio": gpu.sm_active_ratio,
        "dram_bandwidth_ratio": gpu.dram_bandwidth_ratio,
        "memory_used_bytes": gpu.memory_used_bytes,
        "memory_total_bytes": gpu.memory_total_bytes,
        "verdict": verdict,
        "reason": reason,
        "processes": processes,
        "recent_xids": xids,
    }


UNIT = CollectorUnit("gpu", render, status)
