"""Where the agent's resident memory goes: starts `mpswatch run` with each NVML binding given, lets it
run a few cycles, and lists its largest mappings from /proc/PID/smaps (Python heap, shared
libraries such as libnvidia-ml, the interpreter).

    python benchmarks/rss_breakdown.py [--seconds 12] [MODULE ...]   (default: pynvml, the real NVML)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent")]

from tests.agentproc import free_port  # noqa: E402


def mappings(pid: int) -> tuple[dict[str, int], int]:
    """KiB resident per mapped file (anonymous memory as '[anon]'), and the total."""
    per_file: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        header = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if header:
            name = header[1] or "[anon]"
            continue
        if line.startswith("Rss:"):
            per_file[name] = per_file.get(name, 0) + int(line.split()[1])
    return per_file, sum(per_file.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=["pynvml"])
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    report = {}
    for module in args.modules:
        env = {**os.environ, "MPSWATCH_TEST_NVML": module,
               "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        agent = subprocess.Popen([sys.executable, "-m", "tests.agent_main", "run", "--listen", f"127.0.0.1:{free_port()}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(args.seconds)
            per_file, total = mappings(agent.pid)
        finally:
            agent.terminate()
            agent.wait(timeout=20)
        top = sorted(per_file.items(), key=lambda kv: -kv[1])[:12]
        report[module] = {"rss_mib": round(total / 1024, 1), "top_mib": {k: round(v / 1024, 1) for k, v in top}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
