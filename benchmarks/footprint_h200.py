"""The agent's whole footprint on a GPU machine, in one run (issue 19), beside nvidia-smi and nvitop
polling the same facts:

  a. the agent (`mpswatch run` at its default intervals, the real NVML) watching a real MPS daemon
     with two clients and two engines (tests.kit.fakevllm): its CPU with its children (utime, stime,
     cutime, cstime of /proc/PID/stat: the control-program runs it starts) over `--seconds`, as a
     share of one core and as ms a 2 s cycle;
  b. `nvidia-smi --query-gpu=…` and `nvidia-smi --query-compute-apps=…` (two processes: it takes one
     query a run) every 2 s over the same time: CPU a poll and a share of one core;
  c. nvitop's Python API (Device: utilisation, memory, power, temperature, processes) every 2 s in
     a process of its own, over the same time: CPU a poll (after its first) and a share of one core;
  d. one poll of the same facts, in this process: the agent's GPU and MPS collectors against
     nvidia-smi's two queries (CPU with the children, medians of `--rounds`);
  e. the agent's resident memory with the real NVML, with and without bytecode, and the floor below
     it (benchmarks/rss_breakdown.py).

A part whose tool is missing (no nvidia-smi, no nvitop, no MPS control program, no NVML) is skipped
with its reason in the JSON. The MPS daemon runs in a temporary pipe and log dir and is always told
to quit at the end, also on a failure; the whole run has a hard deadline (`--deadline`, SIGALRM).

    python -m benchmarks.footprint_h200 --out OUT.json [--seconds 50] [--rounds 30] [--deadline 340] [--parts abcde]
        [--fake-nvml h200]   # a CPU machine's smoke run: the fake NVML, no daemon (parts a, d, e only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import rss_breakdown
from benchmarks.node_cost import children_cpu_seconds, cpu_seconds, rss_mib
from tests.kit.agentproc import REPO, Agent
from tests.kit.realmps import MpsDaemon, read_line
from tests.kit.stagednode import start_engines

CYCLE_SECONDS = 2.0
GPU_FIELDS = "index,uuid,name,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw,temperature.gpu"
# nvidia-smi takes one --query-* a run (both in one exit with status 2): a poll of the same facts is two runs
SMI_QUERIES = (["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader,nounits"],
               ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory", "--format=csv,noheader,nounits"])
SMI_TIMEOUT_SECONDS = 20.0

_NVITOP_POLLER = """
import json, sys, time
from nvitop import Device
seconds, cycle = float(sys.argv[1]), float(sys.argv[2])
devices = Device.all()
def poll():
    for device in devices:
        device.gpu_utilization(), device.memory_utilization(), device.memory_used(), device.memory_total()
        device.power_usage(), device.temperature()
        for process in device.processes().values():
            process.gpu_memory(), process.name()
poll()  # the first poll loads what nvitop loads once
start_cpu, start = time.process_time(), time.monotonic()
polls, cpus = 0, []
while time.monotonic() - start < seconds:
    before = time.process_time()
    poll()
    cpus.append(time.process_time() - before)
    polls += 1
    time.sleep(max(0.0, start + polls * cycle - time.monotonic()))
elapsed = time.monotonic() - start
for line in open('/proc/self/status'):
    if line.startswith('VmRSS:'):
        rss = int(line.split()[1]) / 1024
print(json.dumps({"polls": polls, "cpu_ms_a_poll_median": sorted(cpus)[len(cpus) // 2] * 1e3,
                  "cpu_share_of_one_core": (time.process_time() - start_cpu) / elapsed, "rss_mib": rss}))
"""


class Deadline(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise Deadline("the run's deadline passed")


def part(result: dict[str, Any], name: str, run: Callable[[], dict[str, Any]]) -> None:
    """Runs one part into result[name]; a failure is recorded as the part's skip reason, the run goes on."""
    started = time.monotonic()
    print(f"footprint: {name} ...", file=sys.stderr, flush=True)
    try:
        result[name] = run()
    except Deadline:
        raise
    except Exception as err:
        result[name] = {"skipped": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    result[name]["part_wall_s"] = round(time.monotonic() - started, 1)


def skip(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


def agent_cpu(mps: MpsDaemon | None, seconds: float, fake_nvml: str | None) -> dict[str, Any]:
    """Part a: the agent with its children over `seconds` at the defaults."""
    engines = start_engines(2)
    args = (["--pipe-dir", str(mps.pipe_dir), "--log-dir", str(mps.log_dir)] if mps else [])
    try:
        with Agent(args, nvml=fake_nvml) as agent:
            time.sleep(2 * CYCLE_SECONDS + 1)  # first cycles, GPM's second sample, the start's memory released
            rss_start = rss_mib(agent.proc.pid)
            own, everything, wall = cpu_seconds(agent.proc.pid), cpu_seconds(agent.proc.pid, children=True), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - wall
            own_share = (cpu_seconds(agent.proc.pid) - own) / elapsed
            share = (cpu_seconds(agent.proc.pid, children=True) - everything) / elapsed
            samples = agent.scrape()
            return {
                "seconds": round(elapsed, 1),
                "cpu_share_of_one_core_own_threads": own_share,
                "cpu_share_of_one_core_with_children": share,
                "cpu_ms_a_2s_cycle_with_children": share * CYCLE_SECONDS * 1e3,
                "rss_mib_start": rss_start, "rss_mib_end": rss_mib(agent.proc.pid),
                "series": len(samples),
                "mps_control_up": {dict(labels).get("pipe_dir", ""): value for (metric, labels), value in samples.items()
                                   if metric == "mps_control_up"},
                "engines_up": sum(v for (m, _), v in samples.items() if m == "mps_engine_up"),
                "gpus": sum(1 for (m, _) in samples if m == "mps_gpu_info"),
                "nvml": fake_nvml or "nvidia-ml-py",
            }
    finally:
        for engine in engines:
            engine.kill()
            engine.wait()


def smi_poll() -> None:
    for query in SMI_QUERIES:
        subprocess.run(query, capture_output=True, check=True, timeout=SMI_TIMEOUT_SECONDS)


def nvidia_smi_cycles(seconds: float) -> dict[str, Any]:
    """Part b: nvidia-smi's two queries every 2 s."""
    if shutil.which("nvidia-smi") is None:
        return skip("nvidia-smi not found")
    smi_poll()  # the first call's start-up costs are not a steady state
    cpus, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        before = children_cpu_seconds()
        smi_poll()
        cpus.append(children_cpu_seconds() - before)
        time.sleep(max(0.0, start + len(cpus) * CYCLE_SECONDS - time.monotonic()))
    elapsed = time.monotonic() - start
    return {"commands": SMI_QUERIES, "polls": len(cpus), "cpu_ms_a_poll_median": statistics.median(cpus) * 1e3,
            "cpu_share_of_one_core": sum(cpus) / elapsed}


def nvitop_cycles(seconds: float) -> dict[str, Any]:
    """Part c: nvitop every 2 s in a process of its own."""
    probe = subprocess.run([sys.executable, "-c", "import nvitop"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return skip(f"nvitop cannot be imported: {probe.stderr.strip().splitlines()[-1:]}")
    out = subprocess.run([sys.executable, "-c", _NVITOP_POLLER, str(seconds), str(CYCLE_SECONDS)], capture_output=True,
                         text=True, timeout=seconds + 60)
    if out.returncode != 0:
        return skip(f"nvitop poller failed: {out.stderr.strip()[-500:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "cycle_seconds": CYCLE_SECONDS}


def timed(poll: Callable[[], object], rounds: int) -> dict[str, float]:
    """Medians and 90th percentiles of a poll's wall time and CPU (this process's and its children's)."""
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu, child = time.perf_counter(), time.process_time(), children_cpu_seconds()
        poll()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu + children_cpu_seconds() - child)
    return {"rounds": rounds, "wall_ms_median": statistics.median(walls) * 1e3,
            "wall_ms_p90": sorted(walls)[int(rounds * 0.9)] * 1e3, "cpu_ms_median": statistics.median(cpus) * 1e3,
            "cpu_ms_p90": sorted(cpus)[int(rounds * 0.9)] * 1e3}


def one_poll(mps: MpsDaemon | None, rounds: int, fake_nvml: str | None) -> dict[str, Any]:
    """Part d: one poll of the GPU and MPS facts, the agent's collectors against nvidia-smi."""
    from mpswatch.collectors.gpu import GpuCollector
    from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector

    if fake_nvml:
        from tests.kit import fakenvml

        gpu = GpuCollector(nvml_loader=getattr(fakenvml, fake_nvml))
    else:
        gpu = GpuCollector()
    result: dict[str, Any] = {}
    try:
        gpu.collect()
        result["agent_gpu_poll"] = timed(gpu.collect, rounds)
    finally:
        gpu.close()
    if mps is None:
        result["agent_mps_poll"] = skip("no MPS daemon")
    else:
        # the full query every time: what the agent sends on a change or a heartbeat (its dearest cycle)
        control = MpsControlCollector(control_bin="nvidia-cuda-mps-control",
                                      discovery=DiscoverySettings(pipe_dirs=(str(mps.pipe_dir),)),
                                      settings_refresh_seconds=30)
        control.collect()
        result["agent_mps_poll"] = timed(control.collect, rounds)
    if shutil.which("nvidia-smi") is None:
        result["nvidia_smi_poll"] = skip("nvidia-smi not found")
    else:
        smi_poll()
        result["nvidia_smi_poll"] = timed(smi_poll, rounds)
        agent = result["agent_gpu_poll"]["cpu_ms_median"] + result["agent_mps_poll"].get("cpu_ms_median", 0.0)
        result["agent_poll_cpu_ms"] = agent
        result["nvidia_smi_over_agent_cpu"] = result["nvidia_smi_poll"]["cpu_ms_median"] / agent if agent else None
    return result


def memory(seconds: float, runs: int, fake_nvml: str | None) -> dict[str, Any]:
    """Part e: rss_breakdown's measure, with and without bytecode, and the floor."""
    binding = fake_nvml or rss_breakdown.REAL_NVML
    return {bytecode: rss_breakdown.measure(binding, bytecode, seconds, runs, with_floor=True)
            for bytecode in ("with", "without")}


def start_mps(mps: MpsDaemon) -> None:
    """The daemon and two PyTorch clients (tests/kit/cuda_client.py), each given 90 s to start."""
    mps.start()
    for size in (2048, 1024):
        client = subprocess.Popen([sys.executable, str(REPO / "tests/kit/cuda_client.py"), str(size),
                                   str(mps.pipe_dir.parent / f"stop-{size}"), "matmul"],
                                  env=mps.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client.stop_file = mps.pipe_dir.parent / f"stop-{size}"  # type: ignore[attr-defined]
        mps.clients.append(client)
        line = read_line(client, timeout=90)
        if not line.startswith("ready"):
            raise RuntimeError(f"an MPS client did not start: {line!r}")


def quit_mps(mps: MpsDaemon) -> None:
    """Clients stopped, then `quit` to the daemon (MpsDaemon.cleanup, bounded), then anything left killed."""
    signal.alarm(0)
    try:
        mps.cleanup()
    finally:
        for client in mps.clients:
            client.kill()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=50.0, help="parts a, b and c each")
    parser.add_argument("--rounds", type=int, default=30, help="part d")
    parser.add_argument("--rss-seconds", type=float, default=8.0)
    parser.add_argument("--rss-runs", type=int, default=3)
    parser.add_argument("--deadline", type=int, default=340, help="seconds for the whole run")
    parser.add_argument("--fake-nvml", choices=["h200"], help="a smoke run on a CPU machine")
    parser.add_argument("--parts", default="abcde", help="which of the parts a to e to run")
    args = parser.parse_args(argv)
    if not set(args.parts) <= set("abcde"):
        parser.error(f"--parts takes letters of abcde, not {args.parts!r}")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.deadline)
    result: dict[str, Any] = {"argv": sys.argv, "python": sys.version, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                       text=True).stdout.strip() or None,
                              "cpus": os.cpu_count()}
    started = time.monotonic()
    mps = None
    with tempfile.TemporaryDirectory(prefix="mpswatch-footprint-", dir="/tmp") as tmp:
        try:
            if args.fake_nvml:
                result["mps_daemon"] = "not started: a smoke run with the fake NVML"
            elif shutil.which("nvidia-cuda-mps-control") is None:
                result["mps_daemon"] = "not started: nvidia-cuda-mps-control not found"
            else:
                mps = MpsDaemon(Path(tmp) / "mps")  # before it starts: a failed start is cleaned up too
                start_mps(mps)
                result["mps_daemon"] = {"pipe_dir": str(mps.pipe_dir), "clients": len(mps.clients)}
            if "a" in args.parts:
                part(result, "a_agent_cpu", lambda: agent_cpu(mps, args.seconds, args.fake_nvml))
            if "b" in args.parts:
                part(result, "b_nvidia_smi_every_2s", lambda: nvidia_smi_cycles(args.seconds))
            if "c" in args.parts:
                part(result, "c_nvitop_every_2s", lambda: nvitop_cycles(args.seconds))
            if "d" in args.parts:
                part(result, "d_one_poll", lambda: one_poll(mps, args.rounds, args.fake_nvml))
            if mps is not None:  # memory with no daemon and no clients: the agent alone, as it starts
                quit_mps(mps)
                signal.alarm(max(1, args.deadline - int(time.monotonic() - started)))
                mps = None
            if "e" in args.parts:
                part(result, "e_memory", lambda: memory(args.rss_seconds, args.rss_runs, args.fake_nvml))
        except Deadline as err:
            result["stopped"] = str(err)
        finally:
            if mps is not None:
                quit_mps(mps)
            signal.alarm(0)
    result["wall_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
