"""The GPU collector with real NVML: load moves GPM, memory per MPS client, a process without
MPS, and an XID from a real illegal memory access.

Writes its figures as JSON to $MPSWATCH_GPU_NVML_RESULTS when set (docs/validation.md quotes them).
"""

from __future__ import annotations

import subprocess
import time

from tests.gpu.results import results_saver
from tests.kit.agentproc import Agent, gpu_uuid

RESULTS: dict = {}


_save_results = results_saver("MPSWATCH_GPU_NVML_RESULTS", RESULTS)


def gpu_values(samples, name):
    gpu0 = gpu_uuid(samples, 0)
    return [v for (n, labels), v in samples.items() if n == name and dict(labels)["gpu_uuid"] == gpu0]


def settle(agent, cycles=3, interval=2.0):
    """Median of the next few cycles' GPM values."""
    seen = {"sm": [], "dram": [], "util": []}
    for _ in range(cycles):
        time.sleep(interval)
        s = agent.scrape()
        seen["sm"] += gpu_values(s, "mps_gpu_sm_active_ratio")
        seen["dram"] += gpu_values(s, "mps_gpu_dram_bandwidth_ratio")
        seen["util"] += gpu_values(s, "mps_gpu_utilization_ratio")
    return {k: sorted(v)[len(v) // 2] if v else None for k, v in seen.items()}


def smi_memory() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "-i", "0", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return {int(pid): int(mib) for pid, mib in (line.split(", ") for line in out.strip().splitlines())}


def test_load_memory_roles_and_xid_on_a_real_gpu(mps, mps_client, tmp_path):
    mps.start()
    with Agent(["--pipe-dir", str(mps.pipe_dir), "--log-dir", str(mps.log_dir)], log_path=tmp_path / "agent.log") as agent:
        agent.wait_for(lambda s: gpu_values(s, "mps_gpu_sm_active_ratio"), timeout=15)
        RESULTS["idle"] = settle(agent)

        matmul = mps.start_client(8192, "matmul", "bfloat16")
        copier = mps.start_client(8192, "copy", "bfloat16")
        alone = mps.start_client(2048, "matmul", "bfloat16", without_mps=True)
        RESULTS["loaded"] = loaded = settle(agent)
        assert loaded["sm"] > RESULTS["idle"]["sm"] + 0.3
        assert loaded["dram"] > RESULTS["idle"]["dram"] + 0.1

        s = agent.scrape()
        # memory by process kind (no PIDs in series labels): the two clients, the one alone, the server
        gpu0 = gpu_uuid(s, 0)
        kinds = {dict(l)["kind"]: v for (n, l), v in s.items()
                 if n == "mps_gpu_memory_by_kind_bytes" and dict(l)["gpu_uuid"] == gpu0}
        smi = smi_memory()
        RESULTS["memory_by_kind_MiB"] = {kind: v / 2**20 for kind, v in kinds.items()}
        RESULTS["nvidia_smi_MiB"] = smi
        assert abs(kinds["mps_client"] / 2**20 - (smi[matmul.pid] + smi[copier.pid])) <= 2
        assert abs(kinds["exclusive"] / 2**20 - smi[alone.pid]) <= 1
        assert "mps_server" in kinds
        mps.stop_clients()

        def xid_31(samples) -> float:
            return sum(v for (n, l), v in samples.items()
                       if n == "mps_gpu_xid_errors_total" and dict(l)["xid"] == "31" and dict(l)["gpu_uuid"] == gpu_uuid(samples, 0))

        before = xid_31(agent.scrape())
        env = {k: v for k, v in mps.env.items() if k != "CUDA_MPS_PIPE_DIRECTORY"}  # fault outside MPS
        faulted = subprocess.run([mps_client, "fault", "1"], env=env, capture_output=True, text=True, timeout=60)
        RESULTS["fault_client"] = faulted.stdout.strip()
        started = time.monotonic()
        after = agent.wait_for(lambda s: xid_31(s) if xid_31(s) > before else None, timeout=15)
        RESULTS["xid_31_counted_after_seconds"] = round(time.monotonic() - started, 2)
        RESULTS["xid_31_count"] = after
        s = agent.scrape()
        RESULTS["collector_duration_seconds"] = [v for (n, l), v in s.items()
                                                 if n == "mps_exporter_collector_duration_seconds" and dict(l)["collector"] == "gpu"]
    RESULTS["agent_log_tail"] = (tmp_path / "agent.log").read_text().splitlines()[-10:]
