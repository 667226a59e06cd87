"""Where the agent's resident memory goes: starts `mpswatch run` (through the test kit's launcher,
tests/kit/agent.py) with each NVML binding given, lets it run a few cycles, and lists its largest
mappings from /proc/PID/smaps (Python heap, shared libraries such as libnvidia-ml, the interpreter).

    python -m benchmarks.rss_breakdown [--seconds 12] [BINDING ...]
        # BINDING: nvidia-ml-py (the real NVML, the default) or a fake of tests.kit.fakenvml (h200, ...)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

from tests.kit.agent import NVML_FAKES
from tests.kit.agentproc import agent_env, free_port, mpswatch_cmd

REAL_NVML = "nvidia-ml-py"


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
    parser.add_argument("bindings", nargs="*", default=[REAL_NVML], choices=[REAL_NVML, *NVML_FAKES])
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    report = {}
    for binding in args.bindings:
        command = mpswatch_cmd("run", "--listen", f"127.0.0.1:{free_port()}", nvml=None if binding == REAL_NVML else binding)
        agent = subprocess.Popen(command, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(args.seconds)
            per_file, total = mappings(agent.pid)
        finally:
            agent.terminate()
            agent.wait(timeout=20)
        top = sorted(per_file.items(), key=lambda kv: -kv[1])[:12]
        report[binding] = {"rss_mib": round(total / 1024, 1), "top_mib": {k: round(v / 1024, 1) for k, v in top}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
