"""Which NVML call grows a process's resident memory? Makes the GPU collector's kinds of NVML call
one kind at a time in a fresh Python process and prints VmRSS, RssAnon and RssFile after each step,
with the shared libraries each step mapped. `--thread` makes the calls on one worker thread (the
agent uses two, the collector's and the XID watcher's; glibc gives a thread its own malloc arena).

    python benchmarks/nvml_rss.py [--thread] [--module pynvml]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import threading
import time
from pathlib import Path


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M)[1]) for key in ("VmRSS", "RssAnon", "RssFile")}


def libraries() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if ".so" in line}


def steps(nvml) -> list[tuple[str, object]]:
    """The GPU collector's kinds of call (collectors/gpu.py), the ones made once first."""
    state: dict[str, object] = {}

    def handle():
        state["h"] = nvml.nvmlDeviceGetHandleByIndex(0)

    def gpm_sample():
        state["s1"] = nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(state["h"], state["s1"])

    def gpm_metrics():
        time.sleep(0.2)
        s2 = nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(state["h"], s2)
        query = nvml.c_nvmlGpmMetricsGet_t()
        query.version = nvml.NVML_GPM_METRICS_GET_VERSION
        query.numMetrics = 1
        query.sample1, query.sample2 = state["s1"], s2
        query.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        nvml.nvmlGpmMetricsGet(query)
        nvml.nvmlGpmSampleFree(state["s1"])
        state["s1"] = s2

    def events():
        state["e"] = nvml.nvmlEventSetCreate()
        nvml.nvmlDeviceRegisterEvents(state["h"], nvml.nvmlEventTypeXidCriticalError, state["e"])

    def event_wait():
        try:
            nvml.nvmlEventSetWait_v2(state["e"], 10)
        except nvml.NVMLError:
            pass

    def processes():
        for fn in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetMPSComputeRunningProcesses):
            for p in fn(state["h"]):
                nvml.nvmlSystemGetProcessName(p.pid)

    return [
        ("nvmlInit", nvml.nvmlInit),
        ("driver version, count", lambda: (nvml.nvmlSystemGetDriverVersion(), nvml.nvmlDeviceGetCount())),
        ("handle, uuid, name", lambda: (handle(), nvml.nvmlDeviceGetUUID(state["h"]), nvml.nvmlDeviceGetName(state["h"]))),
        ("compute mode, utilisation, memory", lambda: (nvml.nvmlDeviceGetComputeMode(state["h"]),
                                                       nvml.nvmlDeviceGetUtilizationRates(state["h"]),
                                                       nvml.nvmlDeviceGetMemoryInfo(state["h"]))),
        ("power, temperature", lambda: (nvml.nvmlDeviceGetPowerUsage(state["h"]),
                                        nvml.nvmlDeviceGetTemperature(state["h"], nvml.NVML_TEMPERATURE_GPU))),
        ("processes and their names", processes),
        ("GPM support", lambda: nvml.nvmlGpmQueryDeviceSupport(state["h"])),
        ("GPM first sample", gpm_sample),
        ("GPM second sample and metrics", gpm_metrics),
        ("XID event set, register", events),
        ("XID event wait", event_wait),
        ("GPM 10 more cycles", lambda: [gpm_metrics() for _ in range(10)]),
        ("nvmlShutdown", nvml.nvmlShutdown),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thread", action="store_true")
    parser.add_argument("--module", default="pynvml")
    args = parser.parse_args()
    rows = [{"step": "python and json, re imported", **memory_kib()}]
    nvml = importlib.import_module(args.module)
    rows.append({"step": f"import {args.module}", **memory_kib()})
    mapped = libraries()

    def run() -> None:
        nonlocal mapped
        for name, call in steps(nvml):
            try:
                call()
                error = None
            except Exception as err:  # a step that fails is reported, the others still run
                error = repr(err)
            now = libraries()
            rows.append({"step": name, **memory_kib(), "new_libraries": sorted(now - mapped), "error": error})
            mapped = now

    if args.thread:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    previous = rows[0]
    for row in rows:
        row["delta_rss_kib"] = row["VmRSS"] - previous["VmRSS"]
        row["delta_anon_kib"] = row["RssAnon"] - previous["RssAnon"]
        previous = row
    print(json.dumps({"thread": args.thread, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
