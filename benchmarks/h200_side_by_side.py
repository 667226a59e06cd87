"""On a GPU machine, in one run: what one poll of the GPU and MPS facts costs the agent, against what
nvidia-smi based exporters do on every scrape and against nvitop's polling of the same facts; then
the agent's effect on real GPU work (two MPS clients with the agent polling every second, or not).

    python benchmarks/h200_side_by_side.py [--quick] OUT.json

Needs: an NVIDIA GPU, nvidia-cuda-mps-control, PyTorch (tests/gpu/cuda_client.py), and nvitop
(a wheel is fine). Starts and stops its own MPS daemon in a temporary directory.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent")]

from mpswatch.collectors.gpu import GpuCollector  # noqa: E402
from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector  # noqa: E402
from tests.agentproc import free_port  # noqa: E402
from tests.gpu.conftest import MpsDaemon  # noqa: E402

SMI = ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu",
       "--format=csv,noheader,nounits"]
SMI_APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(poll, rounds: int) -> dict:
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu, child = time.perf_counter(), time.process_time(), children_cpu()
        poll()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu + children_cpu() - child)
    return {"wall_ms_median": statistics.median(walls) * 1e3, "wall_ms_p90": sorted(walls)[int(rounds * 0.9)] * 1e3,
            "cpu_ms_median": statistics.median(cpus) * 1e3}


def main() -> None:
    quick = "--quick" in sys.argv
    rounds = 50 if quick else 200
    result: dict = {"rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        mps = MpsDaemon(Path(tmp) / "mps")
        try:
            mps.start()
            clients = [mps.start_client(2048), mps.start_client(1024)]
            gpu = GpuCollector()
            gpu.collect()
            control = MpsControlCollector(control_bin="nvidia-cuda-mps-control",
                                          discovery=DiscoverySettings(pipe_dirs=(str(mps.pipe_dir),)),
                                          settings_refresh_seconds=30)
            control.collect()
            result["agent_gpu_poll"] = timed(gpu.collect, rounds)
            result["agent_mps_poll"] = timed(control.collect, rounds)
            result["nvidia_smi_poll"] = timed(lambda: (subprocess.run(SMI, capture_output=True, check=True),
                                                       subprocess.run(SMI_APPS, capture_output=True, check=True)), rounds)
            from nvitop import Device

            devices = Device.all()

            def nvitop_poll() -> None:
                for device in devices:
                    device.gpu_utilization(), device.memory_used(), device.memory_total(), device.power_usage()
                    device.temperature(), device.processes()

            result["nvitop_poll"] = timed(nvitop_poll, rounds)
            gpu.close()
            del clients
            mps.stop_clients()
            result["effect_on_gpu_work"] = effect(mps, 10.0 if quick else 30.0)
        finally:
            mps.cleanup()
    print(json.dumps(result, indent=2))
    Path(sys.argv[-1]).write_text(json.dumps(result, indent=2))


def effect(mps: MpsDaemon, seconds: float) -> dict:
    """Two MPS clients' matmul rate, alternately without and with the agent polling every second."""
    rates: dict[str, list[float]] = {"without_agent": [], "with_agent": []}
    for with_agent in (False, True, False, True):
        agent = None
        if with_agent:
            agent = subprocess.Popen([sys.executable, "-m", "mpswatch", "run", "--listen", f"127.0.0.1:{free_port()}",
                                      "--pipe-dir", str(mps.pipe_dir), "--interval", "1"],
                                     env={**os.environ, "MPSWATCH_GPU_INTERVAL_SECONDS": "1",
                                          "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "1",
                                          "PYTHONPATH": f"{ROOT / 'agent'}:{os.environ.get('PYTHONPATH', '')}"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
        try:
            rates["with_agent" if with_agent else "without_agent"].append(_rate(mps, seconds))
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(timeout=20)
    without, with_ = statistics.mean(rates["without_agent"]), statistics.mean(rates["with_agent"])
    return {"rates_per_second": rates, "difference_ratio": (with_ - without) / without,
            "noise_ratio": abs(rates["without_agent"][0] - rates["without_agent"][1]) / without}


def _rate(mps: MpsDaemon, seconds: float) -> float:
    """Steps (20 bf16 matrix products each) per second of two MPS clients over `seconds`."""
    clients = [mps.start_client(size, "matmul", "bfloat16") for size in (4096, 8192)]
    started = time.monotonic()
    time.sleep(seconds)
    for client in clients:
        Path(client.stop_file).touch()
    steps = 0
    for client in clients:
        line = client.stdout.readline()
        client.wait(timeout=60)
        steps += int(line.split("steps=")[1])
    elapsed = time.monotonic() - started
    mps.clients.clear()
    return steps / elapsed


if __name__ == "__main__":
    main()
