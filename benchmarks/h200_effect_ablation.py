"""Which part of the agent slows GPU work down? Two MPS clients' matmul rate (as in
h200_side_by_side.py) with no agent, the whole agent polling every second, only its GPU collector
(no MPS daemon to ask), and only its MPS collectors (a fake NVML), interleaved.

    python benchmarks/h200_effect_ablation.py [--seconds 15] OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent"), str(ROOT / "benchmarks")]

from h200_side_by_side import _rate  # noqa: E402
from tests.agentproc import free_port  # noqa: E402
from tests.gpu.conftest import MpsDaemon  # noqa: E402

VARIANTS = {
    "no_agent": None,
    "whole_agent": {},
    "gpu_collector_only": {"pipe": "/nonexistent/pipe"},
    "mps_collectors_only": {"MPSWATCH_GPU_NVML_MODULE": "tests.fakenvml:h200"},
}
ORDER = ["no_agent", "whole_agent", "gpu_collector_only", "mps_collectors_only", "no_agent", "whole_agent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("out")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    mps = MpsDaemon(Path(tempfile.mkdtemp(prefix="mpswatch-ablation-")) / "mps")
    try:
        mps.start()
        for variant in ORDER:
            settings = VARIANTS[variant]
            agent = None
            if settings is not None:
                pipe = settings.get("pipe", str(mps.pipe_dir))
                env = {**os.environ, "MPSWATCH_GPU_INTERVAL_SECONDS": "1", "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": "1",
                       "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
                       **{k: v for k, v in settings.items() if k != "pipe"}}
                agent = subprocess.Popen([sys.executable, "-m", "mpswatch", "run", "--listen", f"127.0.0.1:{free_port()}",
                                          "--pipe-dir", pipe, "--log-dir", str(mps.log_dir), "--interval", "1"],
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(2)
            try:
                rates[variant].append(_rate(mps, args.seconds))
            finally:
                if agent is not None:
                    agent.terminate()
                    agent.wait(timeout=20)
            print(variant, round(rates[variant][-1], 2), flush=True)
            Path(args.out).write_text(json.dumps(rates, indent=1))
    finally:
        mps.cleanup()
    base = sum(rates["no_agent"]) / len(rates["no_agent"])
    summary = {v: round(sum(r) / len(r) / base - 1, 4) for v, r in rates.items() if r}
    Path(args.out).write_text(json.dumps({"rates_per_second": rates, "vs_no_agent": summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
