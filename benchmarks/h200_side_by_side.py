"""On a GPU machine, in one run: what one poll of the GPU and MPS facts costs the agent, against what
nvidia-smi based exporters do on every scrape and against nvitop's polling of the same facts; then
the agent's effect on real GPU work (two MPS clients, the agent polling every second in alternating
blocks: benchmarks/h200_effect.py).

    python -m benchmarks.h200_side_by_side [--quick] OUT.json

Needs: an NVIDIA GPU, nvidia-cuda-mps-control, PyTorch (tests/kit/cuda_client.py, benchmarks/gpu_work.py), and nvitop
(a wheel is fine). Starts and stops its own MPS daemon in a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mpswatch.collectors.gpu import GpuCollector
from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector

from benchmarks.footprint_h200 import timed
from benchmarks.h200_effect import run_blocks
from tests.kit.realmps import MpsDaemon

SMI = ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu",
       "--format=csv,noheader,nounits"]
SMI_APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


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
            result["effect_on_gpu_work"] = (run_blocks(mps, block_seconds=10, blocks=7, settle_seconds=3) if quick
                                            else run_blocks(mps, block_seconds=20, blocks=21, settle_seconds=4))
        finally:
            mps.cleanup()
    print(json.dumps(result, indent=2))
    Path(sys.argv[-1]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
