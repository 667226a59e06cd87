"""A fake of the nvidia-ml-py surface the GPU collector uses, replaying a real H200 recording
(tests/fixtures/nvml/nvml-h200-driver580.json, made by tests/gpu/record_nvml.py). The factories at
the end are what an agent under test loads with `python -m tests.kit.agent --nvml FACTORY`.

Knobs reproduce what a real node does: GPM unsupported, a second GPU, one GPU lost, a call that
hangs, NVML failing to initialise, XID events arriving.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

RECORDING = Path(__file__).resolve().parent.parent / "fixtures" / "nvml" / "nvml-h200-driver580.json"

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_NO_DATA = 26
NVML_TEMPERATURE_GPU = 0
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
NVML_GPM_METRICS_GET_VERSION = 1
nvmlEventTypeXidCriticalError = 0x8

_MESSAGES = {
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error {self.value}")


class c_nvmlGpmMetricsGet_t:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(98)]


class _Device(ctypes.Structure):
    _fields_ = [("index", ctypes.c_int)]


_DEVICES: dict[int, _Device] = {}


def _Handle(index: int):
    """Like pynvml's handles: a new ctypes pointer each time, whose == is identity; the device is
    in the address it points to."""
    return ctypes.pointer(_DEVICES.setdefault(index, _Device(index)))


class FakeNvml:
    """Instances stand in for the `pynvml` module."""

    NVMLError = NVMLError
    c_nvmlGpmMetricsGet_t = c_nvmlGpmMetricsGet_t

    def __init__(self, gpus: int = 1, gpm_supported: bool | None = None, init_error: int | None = None) -> None:
        for name, value in globals().items():
            if name.startswith(("NVML_", "nvmlEventType")):
                setattr(self, name, value)
        self.recording = json.loads(RECORDING.read_text())
        device = self.recording["devices"][0]
        self.devices = []
        for index in range(gpus):
            copy = json.loads(json.dumps(device))
            if index:
                copy["uuid"] = device["uuid"][:-2] + f"{index:02d}"
            if gpm_supported is not None:
                copy["gpm_supported"] = gpm_supported
            self.devices.append(copy)
        self.init_error = init_error
        self.failing: dict[int, int] = {}  # GPU index -> NVML error raised by all its calls
        self.hang_in: str | None = None  # name of a call that blocks until `release` is set
        self.release = threading.Event()
        self.xids: queue.Queue[tuple[int, int]] = queue.Queue()
        self.metric_pairs: list[tuple[object, object]] = []  # the samples each nvmlGpmMetricsGet compared
        self.freed: set[int] = set()
        self.gpm_sample_refused = False  # GPM "supported", but samples refused (as under MIG)
        self.mps_list_error: int | None = None  # nvmlDeviceGetMPSComputeRunningProcesses fails
        self.allocated = 0
        self.initialised = False

    # -- helpers
    def _device(self, handle, call: str) -> dict:
        if self.hang_in == call:
            self.release.wait()
        index = handle.contents.index
        if index in self.failing:
            raise NVMLError(self.failing[index])
        return self.devices[index]

    # -- the nvidia-ml-py surface
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.recording["driver_version"]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if index in self.failing:
            raise NVMLError(self.failing[index])
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle) -> str:
        return self._device(handle, "nvmlDeviceGetUUID")["uuid"]

    def nvmlDeviceGetName(self, handle) -> str:
        return self._device(handle, "nvmlDeviceGetName")["name"]

    def nvmlDeviceGetComputeMode(self, handle) -> int:
        return self._device(handle, "nvmlDeviceGetComputeMode")["compute_mode"]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(**self._device(handle, "nvmlDeviceGetUtilizationRates")["utilization"])

    def nvmlDeviceGetMemoryInfo(self, handle):
        memory = self._device(handle, "nvmlDeviceGetMemoryInfo")["memory"]
        return SimpleNamespace(used=memory["used"], total=memory["total"], free=memory["total"] - memory["used"])

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return self._device(handle, "nvmlDeviceGetPowerUsage")["power_mw"]

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return self._device(handle, "nvmlDeviceGetTemperature")["temperature_c"]

    def nvmlGpmQueryDeviceSupport(self, handle):
        return SimpleNamespace(version=1, isSupportedDevice=int(self._device(handle, "nvmlGpmQueryDeviceSupport")["gpm_supported"]))

    def nvmlGpmSampleAlloc(self):
        self.allocated += 1
        return SimpleNamespace(id=self.allocated, taken=False)

    def nvmlGpmSampleFree(self, sample) -> None:
        assert sample.id not in self.freed, "double free"
        self.freed.add(sample.id)

    def nvmlGpmSampleGet(self, handle, sample):
        device = self._device(handle, "nvmlGpmSampleGet")
        if not device["gpm_supported"] or self.gpm_sample_refused:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        sample.taken = True
        return sample

    def nvmlGpmMetricsGet(self, query):
        assert query.sample1.taken and query.sample2.taken and query.sample1 is not query.sample2
        self.metric_pairs.append((query.sample1.id, query.sample2.id))
        recorded = self.devices[0]["gpm_metrics"]
        for i in range(query.numMetrics):
            query.metrics[i].value = recorded[str(query.metrics[i].metricId)]
            query.metrics[i].nvmlReturn = NVML_SUCCESS
        return query

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        device = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device["compute_processes"]]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle):
        device = self._device(handle, "nvmlDeviceGetMPSComputeRunningProcesses")
        if self.mps_list_error is not None:
            raise NVMLError(self.mps_list_error)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in device["mps_processes"]]

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        for device in self.devices:
            if str(pid) in device["process_names"]:
                return device["process_names"][str(pid)].encode()
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, handle, types: int, event_set) -> None:
        assert types == nvmlEventTypeXidCriticalError

    def nvmlEventSetWait_v2(self, event_set, timeout_ms: int):
        try:
            index, xid = self.xids.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError(NVML_ERROR_TIMEOUT) from None
        # a new handle object for the same device, as ctypes gives: equal only by address
        return SimpleNamespace(device=_Handle(index), eventType=nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, event_set) -> None:
        pass


def h200() -> FakeNvml:
    """The recorded H200, one GPU. With
    FAKENVML_MPS_CLIENT_PIDS set (comma-separated), those PIDs are its MPS clients instead of the
    recorded ones, so that processes a test starts are seen on the GPU."""
    fake = FakeNvml()
    pids = [int(p) for p in os.environ.get("FAKENVML_MPS_CLIENT_PIDS", "").split(",") if p]
    if pids:
        device = fake.devices[0]
        device["mps_processes"] = [[pid, 700 << 20] for pid in pids]
        device["compute_processes"] = device["mps_processes"] + [[481, 66 << 20]]
    return fake


def h200_all_mps() -> FakeNvml:
    """The recorded H200 without its process that ran outside MPS: a healthy MPS GPU."""
    fake = FakeNvml()
    for device in fake.devices:
        device["compute_processes"] = [p for p in device["compute_processes"] if p[0] != 431]
    return fake


def no_driver() -> FakeNvml:
    """A node without the NVIDIA driver: NVML's library is not found."""
    return FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND)


def from_layout() -> FakeNvml:
    """For benchmarks: FAKENVML_LAYOUT is JSON {"gpus": N, "clients": [[pid, ...] per GPU]}; each GPU
    gets those PIDs as MPS clients and a server, and a UUID whose first groups differ, as real ones do."""
    layout = json.loads(os.environ["FAKENVML_LAYOUT"])
    fake = FakeNvml(gpus=layout["gpus"])
    for index, (device, pids) in enumerate(zip(fake.devices, layout["clients"])):
        device["uuid"] = f"GPU-{index:08x}-2b6d-037a-0496-f04da35f2f2d"
        device["mps_processes"] = [[pid, 700 << 20] for pid in pids]
        device["compute_processes"] = device["mps_processes"] + [[481, 66 << 20]]
    return fake
