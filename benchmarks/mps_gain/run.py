"""Issue 10: throughput of one engine alone, two engines time-sliced (no MPS) and two engines under
MPS on one GPU, across Qwen2.5 sizes x contexts x workloads, plus a CPU-bound case, with the
mpswatch agent running beside the engines and its live signals stored for every case.

    python3 -m benchmarks.mps_gain.run --sizes 0.5B,1.5B --cpu-bound --budget-s 500 --out a.json --logs logs
    python3 -m benchmarks.mps_gain.run --sizes 3B,7B --budget-s 500 --out b.json --logs logs
    python3 -m benchmarks.mps_gain.run --quick --out quick.json    # 0.5B, context 512, 2 s
    python3 -m benchmarks.mps_gain.report a.json b.json            # the table in docs/mps-gain.md

A launch starts the engines (benchmarks/mps_gain/engine.py) of one size and mode and loops them
over all of that size's cases, so each model is built once per launch. Modes: `alone` (one
engine), `timesliced` (two engines, no MPS: CUDA_MPS_PIPE_DIRECTORY removed from their
environment, and no daemon may serve the default pipe dir), `mps` (two engines attached to a
control daemon started for this launch in a temporary directory and always stopped after it).
Results are written after every launch, so a run cut short keeps what it measured; `--budget-s`
skips a size whose launches would end past the budget. Needs: a GPU, PyTorch, prometheus-client,
nvidia-cuda-mps-control; the agent also needs its own dependencies (structlog, click, nvidia-ml-py)
on PYTHONPATH, and without them the engines are measured all the same, with signals null.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.mps_gain.cases import SHAPES, WORKLOADS, Case, all_marked, format_cases
from benchmarks.mps_gain.report import render_table

ROOT = Path(__file__).resolve().parents[2]
MODES = ("alone", "timesliced", "mps")
CONTEXTS = (128, 512, 2048, 8192)
CPU_BOUND_SIZE, CPU_BOUND_CONTEXT = "0.5B", 512
CPU_WORK_MS = (3.0, 30.0)  # held back by the CPU (about the GPU step), and CPU-bound (over 0.9 of a core)
DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")  # where a client without CUDA_MPS_PIPE_DIRECTORY looks
ENGINE_NAME = "mpsgain"  # served model names mpsgain-0, mpsgain-1: the agent names them mpsgain-N:PORT

# time estimate of a launch: guesses, to be calibrated from a run's printed times
LAUNCH_START_S = 15.0  # torch import, CUDA context, random weights, exit
CASE_OVERHEAD_S = 2.0  # cache, graph capture, first steps, the tail until every engine measured, freeing
MPS_DAEMON_S = 3.0
WAIT_S = 240.0  # for engines to reach a case's measurement (the first case: import, weights, graph)
SCRAPE_BEFORE_END_S = 0.3  # the agent is scraped this long before the measurement window ends

GPU_SIGNALS = ("mps_gpu_sm_active_ratio", "mps_gpu_dram_bandwidth_ratio", "mps_gpu_sm_occupancy_ratio",
               "mps_gpu_tensor_active_ratio", "mps_gpu_utilization_ratio", "mps_gpu_memory_used_bytes")
ENGINE_SIGNALS = ("mps_engine_tokens_per_second", "mps_engine_busiest_thread_cpu_ratio", "mps_engine_cpu_bound",
                  "mps_engine_mps_attached", "mps_engine_gpu_memory_bytes")

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.0f} s] {message}", flush=True)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Launch:
    group: str  # launches compared with each other: a model size, or "cpu-bound"
    size: str
    mode: str
    cases: tuple[Case, ...]

    @property
    def engines(self) -> int:
        return 1 if self.mode == "alone" else 2

    @property
    def name(self) -> str:
        return f"{self.group}-{self.mode}"


def plan(sizes: list[str], contexts: list[int], workloads: list[str], modes: list[str],
         cpu_work_ms: list[float]) -> list[Launch]:
    """Each size in every mode, then the CPU-bound case (0.5B decode at 512) in every mode when
    `cpu_work_ms` is not empty."""
    launches = []
    for size in sizes:
        cases = tuple(Case(context, workload) for context in contexts for workload in workloads)
        launches += [Launch(size, size, mode, cases) for mode in modes]
    if cpu_work_ms:
        cases = tuple(Case(CPU_BOUND_CONTEXT, "decode", ms) for ms in cpu_work_ms)
        launches += [Launch("cpu-bound", CPU_BOUND_SIZE, mode, cases) for mode in modes]
    return launches


def estimate_seconds(launches: list[Launch], seconds: float, warmup: float) -> float:
    return sum(LAUNCH_START_S + (MPS_DAEMON_S if launch.mode == "mps" else 0.0)
               + len(launch.cases) * (CASE_OVERHEAD_S + warmup + seconds) for launch in launches)


# ---------------------------------------------------------------- results


def combine(launch: Launch, engine_lines: list[list[dict]], signals: dict[int, dict | None]) -> list[dict]:
    """One result per case every engine reported: tokens/s of each engine over its own window."""
    shape = SHAPES[launch.size]
    results = []
    for index, case in enumerate(launch.cases):
        reported = [next((line for line in lines if line["case"] == index), None) for lines in engine_lines]
        if not reported or None in reported:
            continue
        per_engine = [line["tokens"] / line["seconds"] for line in reported]
        results.append({
            "size": launch.size,
            "params_billion": shape.params_billion,
            "context": case.context,
            "workload": case.workload,
            "cpu_work_ms": case.cpu_work_ms,
            "mode": launch.mode,
            "tokens_per_second": sum(per_engine),
            "per_engine_tokens_per_second": per_engine,
            "signals": signals.get(index),
        })
    return results


def signals_from_metrics(text: str) -> dict:
    """The agent's live view of the GPU and of our engines (any other vLLM-looking process it
    discovered is left out), from its /metrics; a value it does not export is None."""
    gpus: dict[str, dict] = {}
    engines: dict[str, dict] = {}

    def engine(name: str) -> dict:
        return engines.setdefault(name, {"engine": name, "model": None, "url": None, "gpu_uuid": None})

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            # a GPU's series name it by gpu_uuid only; its index is on mps_gpu_info (results keep "gpu", "uuid")
            if name in GPU_SIGNALS or name == "mps_gpu_info":
                uuid = labels.get("gpu_uuid", "")
                gpu = gpus.setdefault(uuid, {"gpu": None, "uuid": uuid})
                if name == "mps_gpu_info":
                    gpu["gpu"] = labels.get("gpu")
                else:
                    gpu[name] = sample.value
            elif name == "mps_engine_info":
                engine(labels["engine"]).update(model=labels.get("model"), url=labels.get("url"),
                                                gpu_uuid=labels.get("gpu_uuid") or None)
            elif name == "mps_engine_gpu_memory_bytes":  # on each GPU it uses: added up
                entry = engine(labels["engine"])
                entry[name] = (entry.get(name) or 0.0) + sample.value
            elif name in ENGINE_SIGNALS:
                engine(labels["engine"])[name] = sample.value
    ours = sorted(name for name in engines if name.startswith(f"{ENGINE_NAME}-"))
    return {
        "gpus": [{**{key: None for key in GPU_SIGNALS}, **gpus[uuid]} for uuid in sorted(gpus)],
        "engines": [{**{key: None for key in ENGINE_SIGNALS}, **engines[name]} for name in ours],
    }


def write_results(path: Path, results: dict) -> None:
    """Whole or not at all: a run killed while writing keeps the previous file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, path)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_launch(engines: list[subprocess.Popen], agent: Agent | None, daemon: MpsDaemon | None, run_dir: Path) -> None:
    """Engines, agent and daemon stopped, also after a failure; an engine that failed has its log's tail printed."""
    for engine in engines:
        stop_process(engine)
    if agent is not None:
        agent.stop()
    if daemon is not None:
        daemon.stop()
    for index, engine in enumerate(engines):
        if engine.returncode != 0:
            log(f"engine {index} exit status {engine.returncode}:\n{tail(run_dir / f'engine{index}.log')}")


class MpsDaemon:
    """A control daemon of our own in a directory of our own; stop() always ends it and its server."""

    def __init__(self, root: Path) -> None:
        self.pipe_dir, self.log_dir = root / "pipe", root / "log"
        self.pipe_dir.mkdir(parents=True)
        self.log_dir.mkdir(parents=True)
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def start(self) -> None:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True, timeout=30)
        pid_file = self.pipe_dir / "nvidia-cuda-mps-control.pid"
        deadline = time.monotonic() + 15
        while not (pid_file.exists() and pid_file.read_text().strip().isdigit()):
            if time.monotonic() > deadline:
                raise RuntimeError("the MPS control daemon wrote no pid file")
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env,
                           capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as err:
            log(f"MPS quit failed: {err}")
        deadline = time.monotonic() + 15
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self._processes():
            log(f"MPS process {pid} still there after quit: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _processes(self) -> list[int]:
        """The daemon and servers started with our pipe dir, found by their environment."""
        ours = f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode() + b"\0"
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                program = (entry / "cmdline").read_bytes().split(b"\0")[0]
                environ = (entry / "environ").read_bytes() + b"\0"
            except OSError:
                continue
            if b"nvidia-cuda-mps" in program and ours in environ:
                pids.append(int(entry.name))
        return pids


def default_daemon_running() -> bool:
    """A daemon on MPS's default pipe dir would take in engines started without the variable."""
    try:
        pid = int((DEFAULT_PIPE_DIR / "nvidia-cuda-mps-control.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


class Agent:
    """`mpswatch run` as a real process beside the engines. The benchmark never depends on it:
    if it does not start, cases are measured all the same with signals null."""

    def __init__(self, run_dir: Path, daemon: MpsDaemon | None, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = run_dir / "agent.log"
        command = [sys.executable, "-m", "mpswatch", "run", "--listen", f"127.0.0.1:{self.port}",
                   "--interval", "1", "--log-format", "json"]
        if daemon is not None:
            command += ["--pipe-dir", str(daemon.pipe_dir), "--log-dir", str(daemon.log_dir)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("MPSWATCH_")}
        env.update(MPSWATCH_GPU_INTERVAL_SECONDS="1", MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "agent"), env.get("PYTHONPATH")])))
        env.update(extra_env or {})
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.up = False

    def wait_healthy(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as response:
                    self.up = response.status == 200
                    if self.up:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        log(f"agent not up (exit status {self.process.poll()}): signals will be null\n{tail(self.log_path)}")
        return False

    def metrics_text(self, timeout: float = 3.0) -> str | None:
        """The agent's /metrics; None when it is not up or does not answer in time."""
        if not self.up:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as response:
                return response.read().decode()
        except Exception as err:  # down or slow: no signals this time
            log(f"agent scrape failed: {err}")
            return None

    def signals(self) -> dict | None:
        text = self.metrics_text()
        if text is None:
            return None
        try:
            return signals_from_metrics(text)
        except Exception as err:  # text the parser refuses: this case has no signals
            log(f"agent metrics not parsed: {err}")
            return None

    def stop(self) -> None:
        stop_process(self.process)


def engine_env(daemon: MpsDaemon | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without MPS's variables but the daemon's (none: time-sliced), plus `extra`
    (e.g. CUDA_MPS_ACTIVE_THREAD_PERCENTAGE)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}
    env["PYTHONUNBUFFERED"] = "1"
    if daemon is not None:
        env.update(CUDA_MPS_PIPE_DIRECTORY=str(daemon.pipe_dir), CUDA_MPS_LOG_DIRECTORY=str(daemon.log_dir))
    env.update(extra or {})
    return env


def mps_control_missing() -> str | None:
    """Why the MPS mode cannot run here (no nvidia-cuda-mps-control on PATH), else None."""
    if shutil.which("nvidia-cuda-mps-control") is None:
        return "nvidia-cuda-mps-control is not on PATH"
    return None


def engine_command(launch: Launch, index: int, port: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """A command line the agent takes for vLLM's: `... vllm serve MODEL --port P --served-model-name N`."""
    return [sys.executable, "-m", "benchmarks.mps_gain.engine", "vllm", "serve", SHAPES[launch.size].model,
            "--port", str(port), "--served-model-name", f"{ENGINE_NAME}-{index}",
            "--gpu-memory-utilization", f"{0.9 / launch.engines:g}",
            "--run-dir", str(run_dir), "--engines", str(launch.engines), "--engine-index", str(index),
            "--cases", format_cases(launch.cases), "--seconds", f"{args.seconds:g}",
            "--warmup", f"{args.warmup:g}", "--results", str(run_dir / f"engine{index}.jsonl"),
            "--device", args.device]


def start_engine(launch: Launch, index: int, run_dir: Path, daemon: MpsDaemon | None,
                 args: argparse.Namespace, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    command = engine_command(launch, index, free_port(), run_dir, args)
    with (run_dir / f"engine{index}.log").open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=engine_env(daemon, extra_env), stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for_stage(run_dir: Path, case_index: int, stage: str, engines: list[subprocess.Popen]) -> float | None:
    """When every engine has reached `stage`; None when one exited or the wait timed out."""
    deadline = time.monotonic() + WAIT_S
    while not all_marked(run_dir, case_index, stage, len(engines)):
        if any(engine.poll() is not None for engine in engines):
            log(f"an engine exited before case {case_index} {stage}")
            return None
        if time.monotonic() > deadline:
            log(f"engines not at case {case_index} {stage} after {WAIT_S:g} s")
            return None
        time.sleep(0.02)
    return time.monotonic()


def read_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def summary(signals: dict | None) -> str:
    """The agent's view in one short line: SM active, DRAM bandwidth; per engine tokens/s, busiest
    thread, CPU-bound, MPS-attached."""
    if not signals:
        return "agent: no signals"

    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    gpu = signals["gpus"][0] if signals["gpus"] else {}
    parts = [f"agent: SM {number(gpu.get('mps_gpu_sm_active_ratio'))} DRAM {number(gpu.get('mps_gpu_dram_bandwidth_ratio'))}"]
    for engine in signals["engines"]:
        parts.append(f"{engine['engine'].split(':')[0]} {number(engine['mps_engine_tokens_per_second'], 0)} tok/s "
                     f"thread {number(engine['mps_engine_busiest_thread_cpu_ratio'])} "
                     f"cpu_bound {number(engine['mps_engine_cpu_bound'], 0)} mps {number(engine['mps_engine_mps_attached'], 0)}")
    return " | ".join(parts)


def run_engines(launch: Launch, args: argparse.Namespace, run_dir: Path,
                engine_extra_env: list[dict[str, str]] | None = None) -> tuple[list[list[dict]], dict[int, dict | None]]:
    """Runs one launch's daemon (mps), agent and engines in `run_dir` (made here) until its last case,
    and always stops them; returns each engine's result lines and the agent's signals per case.
    `engine_extra_env`: per engine index, variables added to its environment."""
    run_dir.mkdir()
    log(f"{launch.name}: {launch.engines} engine(s) of {SHAPES[launch.size].model}, cases {format_cases(launch.cases)}")
    daemon = MpsDaemon(run_dir / "mps") if launch.mode == "mps" else None
    engines: list[subprocess.Popen] = []
    agent = None
    signals: dict[int, dict | None] = {}
    try:
        if daemon is not None:
            daemon.start()
        elif default_daemon_running():
            raise SystemExit(f"an MPS daemon serves {DEFAULT_PIPE_DIR}: engines meant to run without MPS would attach")
        agent = Agent(run_dir, daemon)
        engines = [start_engine(launch, index, run_dir, daemon, args,
                                (engine_extra_env or [{}] * launch.engines)[index]) for index in range(launch.engines)]
        agent.wait_healthy()
        for index, case in enumerate(launch.cases):
            began = wait_for_stage(run_dir, index, "measuring", engines)
            if began is None:
                break  # the engines left are stopped at once: they would wait for the missing one
            time.sleep(max(0.0, began + args.seconds - SCRAPE_BEFORE_END_S - time.monotonic()))
            signals[index] = agent.signals()
            log(f"{launch.name} {case.spec}: {summary(signals[index])}")
        else:
            for engine in engines:
                try:
                    engine.wait(timeout=WAIT_S)
                except subprocess.TimeoutExpired:
                    log("an engine did not exit after its last case")
    except Exception as err:  # this launch is lost, not the run: the next launches still measure
        log(f"{launch.name} failed: {err!r}")
    finally:
        stop_launch(engines, agent, daemon, run_dir)
    lines = [read_lines(run_dir / f"engine{index}.jsonl") for index in range(len(engines))]
    for index, case in enumerate(launch.cases):
        reported = [line for engine_lines in lines for line in engine_lines if line["case"] == index]
        if reported:
            log(f"{launch.name} {case.spec}: " + ", ".join(
                f"{line['tokens'] / line['seconds']:.0f} tok/s ({line['steps']} steps, "
                f"{line['peak_memory_bytes'] / 2**30:.1f} GiB)" for line in reported))
    return lines, signals


def keep_logs(run_dir: Path, logs: Path | None, name: str) -> None:
    if logs:
        try:
            shutil.copytree(run_dir, logs / name, ignore=shutil.ignore_patterns("pipe", "case*"), dirs_exist_ok=True)
        except OSError as err:
            log(f"logs of {name} not kept: {err}")


def run_launch(launch: Launch, args: argparse.Namespace, tmp: Path, results: dict) -> None:
    """Runs one launch and adds its cases to `results`, written to --out even when cut short."""
    run_dir = tmp / launch.name
    lines: list[list[dict]] = []
    signals: dict[int, dict | None] = {}
    try:
        lines, signals = run_engines(launch, args, run_dir)
    finally:
        lines = lines or [read_lines(run_dir / f"engine{index}.jsonl") for index in range(launch.engines)]
        results["cases"] += combine(launch, lines, signals)
        write_results(args.out, results)
        keep_logs(run_dir, args.logs, launch.name)


def gpu_identity() -> tuple[str, str]:
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
        name, driver = (part.strip() for part in line.split(",", 1))
        return name, driver
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "unknown", "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def listed(kind):
        return lambda text: [kind(item) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=listed(str), default=list(SHAPES), help="comma-separated, of " + ",".join(SHAPES))
    parser.add_argument("--contexts", type=listed(int), default=list(CONTEXTS))
    parser.add_argument("--workloads", type=listed(str), default=list(WORKLOADS))
    parser.add_argument("--modes", type=listed(str), default=list(MODES))
    parser.add_argument("--cpu-bound", action="store_true", help="add 0.5B decode at 512 with --cpu-work-ms")
    parser.add_argument("--cpu-work-ms", type=listed(float), default=list(CPU_WORK_MS),
                        help="busy CPU work per step of the CPU-bound case, one case each")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window of a case")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip a size whose launches would end past it")
    parser.add_argument("--quick", action="store_true", help="0.5B, context 512, both workloads, 2 s")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the harness without a GPU (no MPS mode)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, help="keep each launch's engine, agent and MPS logs here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.contexts, args.seconds = ["0.5B"], [512], 2.0
    unknown = (set(args.sizes) - set(SHAPES)) | (set(args.modes) - set(MODES)) | (set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    if args.device == "cpu" and "mps" in args.modes:
        parser.error("--device cpu has no MPS mode: pass --modes alone,timesliced")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # finally blocks stop MPS
    launches = plan(args.sizes, args.contexts, args.workloads, args.modes, args.cpu_work_ms if args.cpu_bound else [])
    estimate = estimate_seconds(launches, args.seconds, args.warmup)
    case_runs = sum(len(launch.cases) for launch in launches)
    log(f"{len(launches)} launches, {case_runs} case runs, estimated {estimate / 60:.1f} min")
    gpu, driver = gpu_identity()
    results = {"gpu": gpu, "driver": driver, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "seconds": args.seconds, "cases": []}
    with tempfile.TemporaryDirectory(prefix="mps-gain-") as tmp:
        for group, members in groupby(launches, key=lambda launch: launch.group):
            members = list(members)
            need = estimate_seconds(members, args.seconds, args.warmup)
            elapsed = time.monotonic() - _started
            if args.budget_s and elapsed + need > args.budget_s:
                log(f"skipped {group}: about {need:.0f} s from {elapsed:.0f} s would end past the {args.budget_s:g} s budget")
                estimate -= need
                continue
            for launch in members:
                run_launch(launch, args, Path(tmp), results)
                estimate -= estimate_seconds([launch], args.seconds, args.warmup)
                log(f"{launch.name} done; about {estimate / 60:.1f} min of launches left")
    print(render_table(results), flush=True)


if __name__ == "__main__":
    main()
