"""Where the agent's resident memory goes: starts `mpswatch run` (through the test kit's launcher,
tests/kit/agent.py) with each NVML binding given, lets it run a few cycles, and lists its largest
mappings from /proc/PID/smaps (Python heap, shared libraries such as libnvidia-ml, the interpreter).

With and without bytecode: the agent and the third-party packages it imports (STAGED) are copied to
a temporary directory put first on the path, compiled there (`with`, as `pip install` leaves them)
or not, and then run with PYTHONDONTWRITEBYTECODE=1 (`without`: every start compiles them, and the
compiler's garbage stays in the heap). The standard library keeps its bytecode in both; so does the
test kit's launcher (not part of an installed agent). `--bytecode installed` runs the packages where
they are installed.

`--floor` also measures, each in a fresh process, what a bare interpreter holds and what each layer
of the agent's imports adds (the standard library's, the third-party packages', the agent's own),
and for the real NVML what `nvmlInit` adds: the parts the agent cannot do without.

    python -m benchmarks.rss_breakdown [--seconds 10] [--runs 3] [--bytecode with|without|installed ...]
                                       [--floor] [--json OUT] [BINDING ...]
        # BINDING: nvidia-ml-py (the real NVML, the default) or a fake of tests.kit.fakenvml (h200, ...)
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kit.agent import NVML_FAKES
from tests.kit.agentproc import REPO, agent_env, free_port, mpswatch_cmd

REAL_NVML = "nvidia-ml-py"
# what `mpswatch run` imports from outside the standard library (only those installed are staged)
STAGED = ("mpswatch", "structlog", "prometheus_client", "click", "pynvml")

# the layers of --floor, each imported on top of the one before in a fresh process
LAYERS = (
    ("standard library the agent imports", "import asyncio, ssl, json, ipaddress, zoneinfo, tomllib, ctypes, "
                                           "concurrent.futures, dataclasses, pathlib, http.client"),
    ("third-party packages (click, structlog, prometheus_client)", "import click, structlog, prometheus_client"),
    ("the agent's own modules (mpswatch.cli and what it imports)", "import mpswatch.cli"),
)
_LAYER_PROBE = """
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
steps = [('bare interpreter', rss())]
for name, code in LAYERS:
    exec(code)
    steps.append((name, rss()))
if REAL:
    import pynvml
    steps.append(('import pynvml', rss()))
    try:
        pynvml.nvmlInit()
        steps.append(('nvmlInit', rss()))
    except pynvml.NVMLError as err:
        steps.append((f'nvmlInit failed: {err}', rss()))
print(repr(steps))
"""


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


def stage(into: Path, bytecode: bool) -> list[str]:
    """Copies STAGED's installed packages into `into` without their __pycache__; compiles them with
    `bytecode`. Returns the names staged."""
    staged = []
    for name in STAGED:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        source = Path(spec.origin)
        if spec.submodule_search_locations:
            shutil.copytree(source.parent, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, into / source.name)
        staged.append(name)
    if bytecode:
        compileall.compile_dir(into, quiet=1, workers=1)
    return staged


def env_for(site: Path | None, bytecode: bool) -> dict[str, str]:
    env = agent_env()
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def one_run(binding: str, env: dict[str, str], seconds: float) -> tuple[dict[str, int], int]:
    command = mpswatch_cmd("run", "--listen", f"127.0.0.1:{free_port()}", nvml=None if binding == REAL_NVML else binding)
    agent = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        if agent.poll() is not None:
            raise RuntimeError(f"the agent ({binding}) exited with {agent.returncode} before it was measured")
        return mappings(agent.pid)
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def floor(env: dict[str, str], real_nvml: bool) -> list[dict[str, object]]:
    """RSS after each layer of imports in a fresh process (MiB) and what each layer added."""
    code = f"LAYERS = {LAYERS!r}\nREAL = {real_nvml!r}\n{_LAYER_PROBE}"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    steps = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own probe's repr of a list of tuples
    rows, before = [], 0
    for name, kib in steps:
        rows.append({"step": name, "rss_mib": round(kib / 1024, 1), "adds_mib": round((kib - before) / 1024, 1)})
        before = kib
    return rows


def measure(binding: str, bytecode: str, seconds: float, runs: int, with_floor: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="mpswatch-rss-") as tmp:
        site = None if bytecode == "installed" else Path(tmp)
        staged = stage(site, bytecode == "with") if site is not None else []
        env = env_for(site, bytecode != "without")
        totals, per_file_runs = [], []
        for _ in range(runs):
            per_file, total = one_run(binding, env, seconds)
            totals.append(total)
            per_file_runs.append(per_file)
        names = {name for run in per_file_runs for name in run}
        median_per_file = {name: statistics.median(run.get(name, 0) for run in per_file_runs) for name in names}
        top = sorted(median_per_file.items(), key=lambda kv: -kv[1])[:12]
        result: dict[str, object] = {
            "binding": binding, "bytecode": bytecode, "staged": staged, "runs": runs, "seconds": seconds,
            "rss_mib_median": round(statistics.median(totals) / 1024, 1),
            "rss_mib_runs": [round(t / 1024, 1) for t in totals],
            "top_mib": {k: round(v / 1024, 1) for k, v in top},
        }
        if with_floor:
            result["floor"] = floor(env, binding == REAL_NVML)
        return result


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bindings", nargs="*", help=f"{', '.join([REAL_NVML, *NVML_FAKES])}; default: {REAL_NVML}")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bytecode", nargs="+", default=["with", "without"], choices=["with", "without", "installed"])
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for binding in args.bindings:
        if binding not in (REAL_NVML, *NVML_FAKES):
            parser.error(f"no such binding: {binding}")
    report = [measure(binding, bytecode, args.seconds, args.runs, args.floor)
              for binding in args.bindings or [REAL_NVML] for bytecode in args.bytecode]
    print(json.dumps(report, indent=1))
    for r in report:
        print(f"{r['binding']}, bytecode {r['bytecode']}: median {r['rss_mib_median']} MiB of {r['rss_mib_runs']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
