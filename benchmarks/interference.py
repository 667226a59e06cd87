"""Issue 18's proof on a GPU: a light steady decoder (A) and a bursting prefiller (B) on one GPU,
under MPS and time-sliced; A's inter-token latency with B idle and with B bursting, from A's own
step times, and when the mpswatch agent running beside them names B as A's noisy neighbour.

    python3 -m benchmarks.interference --out interference.json --logs logs        # both modes, ~4.5 min
    python3 -m benchmarks.interference --device cpu --quick --out /tmp/i.json     # a smoke test, no GPU

Per mode, the engines are benchmarks/mps_gain/engine.py with a role instead of cases:

- A (`--role steady`): Qwen2.5-0.5B's shape decoding 4 sequences over 512 tokens of cache, paced to
  50 steps a second (a step of about a millisecond or two every 20 ms: the GPU mostly idle, as a
  lightly loaded engine leaves it, and 2,000 inter-token latencies in each of the agent's 10 s
  windows, plenty for a steady mean). Its inter-token latency is each step's own time.
- B (`--role bursting`): Qwen2.5-1.5B's shape, idle (nothing on the GPU, running 0, prompt counter
  flat) except in burst phases, where it runs back-to-back prefill steps of 8192 prompt tokens
  (4 prompts of 2048; running 4).

Both follow one timetable from an origin the harness writes once both are built: quiet 30 s (the
agent's quiet baseline), then 2 cycles of burst 20 s and idle 20 s (`--timetable`). A writes, per
phase, its exact ITL p50/p99/mean from raw step times with the phase's wall-clock start and end,
and then per phase kind. The agent (`mpswatch run`, engines scraped every second) runs beside them;
its /metrics is polled every 0.5 s and the samples of mps_engine_interference_slowdown_ratio,
mps_engine_burst, mps_engine_inter_token_latency_slowdown_ratio, ..._baseline_seconds and
mps_engine_latency_mean_seconds{latency="inter_token"} are kept with their wall-clock time (absent
series are tolerated: on a machine without a GPU the agent attributes no engine to a GPU). From
them, per burst: the delay from its start to the first sample naming B as A's neighbour, and how
long after its end B was still named; false detections: samples naming any neighbour in the quiet
phase, or in an idle phase later than `--grace-s` after it began (the agent's figures cover its
last 10 s, so B is still rightly named for a while after its burst). Engines are named as the agent
names them (served name `mpsint-steady`, `mpsint-bursting`, then `:PORT`), read from its
mps_engine_info.

Modes: `mps` (a control daemon of the run's own, always stopped after the mode; skipped with a
message where nvidia-cuda-mps-control is missing) and `timesliced` (no MPS variable in the engines'
environment; refused if a daemon serves MPS's default pipe dir). The JSON is written after each mode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.mps_gain.cases import SHAPES
from benchmarks.mps_gain.run import (
    DEFAULT_PIPE_DIR,
    ROOT,
    Agent,
    MpsDaemon,
    default_daemon_running,
    engine_env,
    free_port,
    gpu_identity,
    keep_logs,
    log,
    mps_control_missing,
    read_lines,
    stop_launch,
    write_results,
)
from benchmarks.mps_gain.timing import parse_timetable

MODES = ("mps", "timesliced")
SERVED = {"steady": "mpsint-steady", "bursting": "mpsint-bursting"}  # the agent names them NAME:PORT
POLL_S = 0.5
LEAD_S = 1.0  # from writing the origin to the timetable's start
READY_TIMEOUT_S = 240.0
START_S, STOP_S, MPS_DAEMON_S = 20.0, 5.0, 2.0  # estimate only: engine start to ready, stopping, the daemon
GRACE_S = 12.0  # the agent's recent window (10 s) and a scrape interval or two
AGENT_SERIES = {
    "mps_engine_burst": "burst",
    "mps_engine_inter_token_latency_slowdown_ratio": "itl_slowdown",
    "mps_engine_inter_token_latency_baseline_seconds": "itl_baseline_s",
}
WANTED = (*AGENT_SERIES, "mps_engine_interference_slowdown_ratio", "mps_engine_latency_mean_seconds",
          "mps_engine_info")


# ---------------------------------------------------------------- the agent's samples


def agent_sample(text: str, at: float) -> dict:
    """What the agent says now of our engines (and any neighbour it names for anyone)."""
    lines = [line for line in text.splitlines() if line.startswith(WANTED)]
    sample: dict = {"t": at, "interference": [], "engines": {}, "info": {}}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for s in family.samples:
            engine = s.labels.get("engine", "")
            if s.name == "mps_engine_interference_slowdown_ratio":
                sample["interference"].append({"engine": engine, "neighbour": s.labels.get("neighbour", ""),
                                               "value": s.value})
            elif not engine.startswith("mpsint-"):
                continue
            elif s.name == "mps_engine_info":
                sample["info"][engine] = {"url": s.labels.get("url", ""), "gpu_uuid": s.labels.get("gpu_uuid", "")}
            elif s.name in AGENT_SERIES:
                sample["engines"].setdefault(engine, {})[AGENT_SERIES[s.name]] = s.value
            elif s.name == "mps_engine_latency_mean_seconds" and s.labels.get("latency") == "inter_token":
                sample["engines"].setdefault(engine, {})["itl_mean_s"] = s.value
    return sample


def agent_name(samples: list[dict], served: str, port: int) -> str | None:
    """The agent's name for an engine: its mps_engine_info's `engine` label, by served name or URL port."""
    for sample in reversed(samples):
        for name, info in sample.get("info", {}).items():
            if name.startswith(f"{served}:") or info.get("url", "").startswith(f"http://127.0.0.1:{port}/"):
                return name
    return None


# ---------------------------------------------------------------- the analysis (pure)


def _names(sample: dict, engine: str | None = None, neighbour: str | None = None) -> bool:
    return any((engine is None or entry["engine"] == engine) and (neighbour is None or entry["neighbour"] == neighbour)
               for entry in sample["interference"])


def detection(phases: list[dict], samples: list[dict], steady: str | None, bursting: str | None,
              grace_s: float = GRACE_S) -> dict:
    """From the phases (name, kind, start, end: wall-clock) and the agent's samples: per burst, when
    B was first named as A's neighbour and how long after the burst's end it still was (until the
    end of the idle phase that follows), when B's own burst flag rose and fell; and the false
    detections (any neighbour named, for any engine) in quiet phases and in idle phases past
    `grace_s` after they began."""
    bursts = []
    for index, phase in enumerate(phases):
        if phase["kind"] != "burst":
            continue
        following = phases[index + 1] if index + 1 < len(phases) and phases[index + 1]["kind"] == "idle" else None
        until = following["end"] if following else phase["end"]
        window = [s for s in samples if phase["start"] <= s["t"] < until]
        during = [s for s in window if s["t"] < phase["end"]]
        hits = [s["t"] for s in window if steady and bursting and _names(s, steady, bursting)]
        flags = [s["t"] for s in window if bursting and s["engines"].get(bursting, {}).get("burst") == 1]
        first = min(hits) if hits else None
        covered = [s for s in during if first is not None and s["t"] >= first]
        slowdowns = [s["engines"].get(steady, {}).get("itl_slowdown") for s in during] if steady else []
        slowdowns = [value for value in slowdowns if value is not None]
        bursts.append({
            "phase": phase["name"],
            "samples": len(during),
            "detect_delay_s": None if first is None else first - phase["start"],
            "detected_in_burst": first is not None and first < phase["end"],
            "named_share_after_detection": (sum(_names(s, steady, bursting) for s in covered) / len(covered)
                                            if covered else None),
            "named_until_after_end_s": None if not hits else max(hits) - phase["end"],
            "burst_flag_delay_s": None if not flags else min(flags) - phase["start"],
            "burst_flag_until_after_end_s": None if not flags else max(flags) - phase["end"],
            "steady_slowdown_max": max(slowdowns) if slowdowns else None,
        })
    false_samples, in_grace = [], 0
    for phase in phases:
        if phase["kind"] == "burst":
            continue
        for s in samples:
            if not (phase["start"] <= s["t"] < phase["end"]) or not _names(s):
                continue
            if phase["kind"] == "idle" and s["t"] < phase["start"] + grace_s:
                in_grace += 1
            else:
                false_samples.append({"t": s["t"], "phase": phase["name"], "interference": s["interference"]})
    return {"steady": steady, "bursting": bursting, "grace_s": grace_s, "samples": len(samples),
            "bursts": bursts, "false_detections": len(false_samples), "false_detection_samples": false_samples,
            "named_in_idle_within_grace": in_grace}


def itl_by_kind(steady_lines: list[dict]) -> dict:
    """A's summary lines by phase kind (quiet, burst, idle, calm = quiet + idle), and burst over calm."""
    kinds = {line["summary"]: {key: line.get(key) for key in ("itl_p50_s", "itl_p99_s", "itl_mean_s", "itl_n")}
             for line in steady_lines if "summary" in line}
    ratio = {}
    calm, burst = kinds.get("calm", {}), kinds.get("burst", {})
    for key in ("itl_p50_s", "itl_p99_s", "itl_mean_s"):
        if calm.get(key) and burst.get(key) is not None:
            ratio[key.removesuffix("_s")] = burst[key] / calm[key]
    return {"by_kind": kinds, "burst_over_calm": ratio}


# ---------------------------------------------------------------- one mode


def engine_command(role: str, index: int, port: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    size, extra = (args.steady_size, ["--context", str(args.steady_context), "--batch", str(args.steady_batch),
                                      "--steps-per-second", f"{args.steps_per_second:g}"]) if role == "steady" else \
        (args.bursting_size, ["--context", str(args.bursting_context), "--prefill-tokens", str(args.prefill_tokens)])
    return [sys.executable, "-m", "benchmarks.mps_gain.engine", "vllm", "serve", SHAPES[size].model,
            "--port", str(port), "--served-model-name", SERVED[role], "--gpu-memory-utilization", "0.45",
            "--run-dir", str(run_dir), "--engines", "2", "--engine-index", str(index), "--role", role,
            "--timetable", args.timetable, "--results", str(run_dir / f"engine{index}.jsonl"),
            "--device", args.device, *extra]


def wait_ready(run_dir: Path, engines: list[subprocess.Popen]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all((run_dir / f"ready.{index}").exists() for index in range(len(engines))):
        if any(engine.poll() is not None for engine in engines):
            log("an engine exited before it was ready")
            return False
        if time.monotonic() > deadline:
            log(f"engines not ready after {READY_TIMEOUT_S:g} s")
            return False
        time.sleep(0.05)
    return True


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Runs one mode and returns its result; the daemon, agent and engines are always stopped."""
    run_dir = tmp / mode
    run_dir.mkdir()
    phases = parse_timetable(args.timetable)
    began = time.monotonic()
    daemon = MpsDaemon(run_dir / "mps") if mode == "mps" else None
    engines: list[subprocess.Popen] = []
    ports = {role: free_port() for role in SERVED}
    agent = None
    samples: list[dict] = []
    origin = None
    error = None
    try:
        if daemon is not None:
            daemon.start()
        elif default_daemon_running():
            raise RuntimeError(f"an MPS daemon serves {DEFAULT_PIPE_DIR}: engines meant to run without MPS would attach")
        agent = Agent(run_dir, daemon, dict(item.split("=", 1) for item in args.agent_env))
        for index, role in enumerate(SERVED):
            command = engine_command(role, index, ports[role], run_dir, args)
            with (run_dir / f"engine{index}.log").open("wb") as out:
                engines.append(subprocess.Popen(command, cwd=ROOT, env=engine_env(daemon), stdout=out,
                                                stderr=subprocess.STDOUT))
        agent.wait_healthy()
        if not wait_ready(run_dir, engines):
            raise RuntimeError("engines not ready")
        origin = time.time() + LEAD_S
        start = run_dir / "start"
        start.with_suffix(".partial").write_text(repr(origin))
        os.replace(start.with_suffix(".partial"), start)
        log(f"{mode}: engines ready after {time.monotonic() - began:.0f} s; timetable {args.timetable} from now")
        end = origin + phases[-1].end + 1.0
        next_poll, reported = time.time(), None
        while (now := time.time()) < end:
            text = agent.metrics_text(timeout=POLL_S * 0.8)
            if text is not None:
                try:
                    samples.append(agent_sample(text, now))
                except Exception as err:  # a body the parser refuses: this sample is lost, not the run
                    log(f"agent metrics not parsed: {err}")
            phase = next((p for p in phases if origin + p.start <= now < origin + p.end), None)
            if phase is not None and phase.name != reported:
                ended = f"; agent as {reported} ended: {short(samples[-1] if samples else None)}" if reported else ""
                reported = phase.name
                log(f"{mode}: {phase.name} begins ({phase.end - phase.start:g} s){ended}")
            if any(engine.poll() not in (None, 0) for engine in engines):
                raise RuntimeError("an engine failed during the timetable")
            next_poll += POLL_S
            time.sleep(max(0.0, next_poll - time.time()))
        for engine in engines:
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("an engine did not exit after the timetable")
    except Exception as err:  # this mode is lost, not the run: the next mode still measures
        error = repr(err)
        log(f"{mode} failed: {err!r}")
    finally:
        stop_launch(engines, agent, daemon, run_dir)
        keep_logs(run_dir, args.logs, f"interference-{mode}")
    steady_lines, bursting_lines = (read_lines(run_dir / f"engine{index}.jsonl") for index in range(2))
    names = {role: agent_name(samples, SERVED[role], ports[role]) for role in SERVED}
    absolute = [] if origin is None else [{"name": p.name, "kind": p.kind, "start": origin + p.start,
                                           "end": origin + p.end} for p in phases]
    return {
        "mode": mode, "error": error, "wall_s": time.monotonic() - began, "origin": origin, "phases": absolute,
        "names": names, "gpu_uuid": {role: last_gpu(samples, names[role]) for role in SERVED},
        "steady_itl": itl_by_kind(steady_lines),
        "steady_phases": [line for line in steady_lines if "phase" in line],
        "bursting_phases": [line for line in bursting_lines if "phase" in line],
        "detection": detection(absolute, samples, names["steady"], names["bursting"], args.grace_s),
        "timeline": samples,
    }


def last_gpu(samples: list[dict], name: str | None) -> str | None:
    for sample in reversed(samples):
        info = sample.get("info", {}).get(name or "")
        if info is not None:
            return info.get("gpu_uuid") or None
    return None


def short(sample: dict | None) -> str:
    if sample is None:
        return "no sample"
    named = ", ".join(f"{e['engine'].split(':')[0]} slowed {e['value']:.2f}x by {e['neighbour'].split(':')[0]}"
                      for e in sample["interference"]) or "nobody named"
    bursting = [name.split(":")[0] for name, values in sample["engines"].items() if values.get("burst") == 1]
    return f"{named}; bursting: {', '.join(bursting) or 'none'}"


def report(result: dict) -> str:
    """A few lines per mode: A's ITL by phase kind, and the agent's detections."""
    if "skipped" in result:
        return f"{result['mode']}: skipped ({result['skipped']})"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.2f} ms"

    lines = [f"{result['mode']}: agent names {result['names']}; error {result['error']}"]
    for kind, figures in result["steady_itl"]["by_kind"].items():
        lines.append(f"  A ITL {kind:6} p50 {ms(figures['itl_p50_s'])} p99 {ms(figures['itl_p99_s'])} "
                     f"mean {ms(figures['itl_mean_s'])} ({figures['itl_n']} steps)")
    ratio = result["steady_itl"]["burst_over_calm"]
    if ratio:
        lines.append("  burst / calm: " + ", ".join(f"{key} {value:.2f}x" for key, value in ratio.items()))
    found = result["detection"]
    for burst in found["bursts"]:
        delay, until = burst["detect_delay_s"], burst["named_until_after_end_s"]
        lines.append(f"  {burst['phase']}: B named after {'-' if delay is None else f'{delay:.1f} s'}, "
                     f"until {'-' if until is None else f'{until:+.1f} s'} after its end; "
                     f"A's slowdown max {burst['steady_slowdown_max']}")
    lines.append(f"  false detections: {found['false_detections']} of {found['samples']} samples "
                 f"({found['named_in_idle_within_grace']} named within {found['grace_s']:g} s of an idle start)")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def estimate_seconds(modes: list[str], timetable: str) -> float:
    total = parse_timetable(timetable)[-1].end
    return sum(START_S + LEAD_S + total + 1.0 + STOP_S + (MPS_DAEMON_S if mode == "mps" else 0.0) for mode in modes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results, JSON, written after each mode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of mps,timesliced")
    parser.add_argument("--timetable", default="30,20,20,2", help="QUIET,BURST,IDLE,CYCLES seconds")
    parser.add_argument("--grace-s", type=float, default=GRACE_S,
                        help="seconds after an idle phase begins in which the agent may still name B")
    parser.add_argument("--steady-size", default="0.5B", choices=list(SHAPES))
    parser.add_argument("--steady-context", type=int, default=512)
    parser.add_argument("--steady-batch", type=int, default=4)
    parser.add_argument("--steps-per-second", type=float, default=50.0, help="A's pacing")
    parser.add_argument("--bursting-size", default="1.5B", choices=list(SHAPES))
    parser.add_argument("--bursting-context", type=int, default=2048, help="B's prompt length")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="B's prompt tokens a prefill step")
    parser.add_argument("--agent-env", action="append", default=[], metavar="MPSWATCH_X=VALUE",
                        help="an extra variable for the agent (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: timetable 4,4,6,2, grace 3 s, B 0.5B, A's context 128, B's 64-token prefills")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--logs", type=Path, help="keep each mode's engine, agent and MPS logs here")
    args = parser.parse_args(argv)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if set(args.modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(set(args.modes) - set(MODES)))}")
    if any("=" not in item for item in args.agent_env):
        parser.error("--agent-env takes NAME=VALUE")
    if args.quick:
        args.timetable, args.grace_s, args.bursting_size = "4,4,6,2", 3.0, "0.5B"
        args.steady_context, args.bursting_context, args.prefill_tokens = 128, 32, 64
    try:
        parse_timetable(args.timetable)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # finally blocks stop MPS
    log(f"modes {','.join(args.modes)}, timetable {args.timetable}: estimated "
        f"{estimate_seconds(args.modes, args.timetable) / 60:.1f} min")
    gpu, driver = gpu_identity()
    results = {"gpu": gpu, "driver": driver, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "settings": {key: value for key, value in vars(args).items() if key not in ("out", "logs")},
               "modes": {}}
    with tempfile.TemporaryDirectory(prefix="interference-") as tmp:
        for mode in args.modes:
            missing = mps_control_missing() if mode == "mps" else None
            if missing or (mode == "mps" and args.device == "cpu"):
                reason = missing or "--device cpu"
                log(f"mps: skipped: {reason}")
                results["modes"][mode] = {"mode": mode, "skipped": reason}
            else:
                results["modes"][mode] = run_mode(mode, args, Path(tmp))
            write_results(args.out, results)
            print(report(results["modes"][mode]), flush=True)
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
