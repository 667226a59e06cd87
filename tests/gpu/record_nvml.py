"""Records the real return values of every NVML call the GPU collector makes, for the fake NVML.

Run on a GPU machine while MPS clients and one process without MPS run:
    python3 tests/gpu/record_nvml.py OUT.json
The JSON is replayed by tests/kit/fakenvml.py; its file name carries the driver version.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import time

import pynvml as nvml

GPM_METRICS = {
    "sm_active": nvml.NVML_GPM_METRIC_SM_UTIL,
    "sm_occupancy": nvml.NVML_GPM_METRIC_SM_OCCUPANCY,
    "tensor_active": nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    "dram_bandwidth": nvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
}


def timed(record: dict, name: str, call, *args):
    started = time.perf_counter()
    try:
        value = call(*args)
    except nvml.NVMLError as err:
        record.setdefault("errors", {})[name] = err.value
        value = None
    record.setdefault("seconds", {})[name] = time.perf_counter() - started
    return value


def decode(value):
    return value.decode() if isinstance(value, bytes) else value


def gpm(handle, record) -> dict:
    first, second = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
    try:
        timed(record, "nvmlGpmSampleGet", nvml.nvmlGpmSampleGet, handle, first)
        time.sleep(1.0)
        timed(record, "nvmlGpmSampleGet", nvml.nvmlGpmSampleGet, handle, second)
        query = nvml.c_nvmlGpmMetricsGet_t()
        query.version = nvml.NVML_GPM_METRICS_GET_VERSION
        query.numMetrics = len(GPM_METRICS)
        query.sample1, query.sample2 = first, second
        for i, metric_id in enumerate(GPM_METRICS.values()):
            query.metrics[i].metricId = metric_id
        timed(record, "nvmlGpmMetricsGet", nvml.nvmlGpmMetricsGet, query)
        return {str(query.metrics[i].metricId): query.metrics[i].value for i in range(len(GPM_METRICS))}
    finally:
        nvml.nvmlGpmSampleFree(first)
        nvml.nvmlGpmSampleFree(second)


def main(out: str) -> None:
    nvml.nvmlInit()
    recording: dict = {"driver_version": decode(nvml.nvmlSystemGetDriverVersion()), "devices": []}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        device: dict = {}
        device["uuid"] = decode(timed(device, "nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, handle))
        device["name"] = decode(timed(device, "nvmlDeviceGetName", nvml.nvmlDeviceGetName, handle))
        device["compute_mode"] = timed(device, "nvmlDeviceGetComputeMode", nvml.nvmlDeviceGetComputeMode, handle)
        util = timed(device, "nvmlDeviceGetUtilizationRates", nvml.nvmlDeviceGetUtilizationRates, handle)
        device["utilization"] = {"gpu": util.gpu, "memory": util.memory}
        memory = timed(device, "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo, handle)
        device["memory"] = {"used": memory.used, "total": memory.total}
        device["power_mw"] = timed(device, "nvmlDeviceGetPowerUsage", nvml.nvmlDeviceGetPowerUsage, handle)
        device["temperature_c"] = timed(
            device, "nvmlDeviceGetTemperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        support = timed(device, "nvmlGpmQueryDeviceSupport", nvml.nvmlGpmQueryDeviceSupport, handle)
        device["gpm_supported"] = bool(support and support.isSupportedDevice)
        device["gpm_metrics"] = gpm(handle, device) if device["gpm_supported"] else {}
        procs = timed(device, "nvmlDeviceGetComputeRunningProcesses", nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        device["compute_processes"] = [[p.pid, p.usedGpuMemory] for p in procs or []]
        mps = timed(device, "nvmlDeviceGetMPSComputeRunningProcesses", nvml.nvmlDeviceGetMPSComputeRunningProcesses, handle)
        device["mps_processes"] = [[p.pid, p.usedGpuMemory] for p in mps or []]
        device["process_names"] = {
            str(pid): decode(timed(device, "nvmlSystemGetProcessName", nvml.nvmlSystemGetProcessName, pid))
            for pid, _ in device["compute_processes"]
        }
        recording["devices"].append(device)
    recording["proc_driver_information"] = {
        path: open(path).read() for path in glob.glob("/proc/driver/nvidia/gpus/*/information")
    }
    recording["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    nvml.nvmlShutdown()
    with open(out, "w") as handle:
        json.dump(recording, handle, indent=2, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
