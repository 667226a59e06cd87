"""Soak on a real GPU: the agent watches its own MPS daemon while a client starts and exits every
few seconds and a client faults once a minute. Reports the agent's RSS, open fds and threads over
time, whether /metrics answered throughout, and the agent's event counts against the lines in the
MPS logs (counted here with plain regular expressions, not with the agent's parser).

    python3 -m tests.gpu.soak --seconds 600 --out soak.json     (on the GPU machine; ~10.5 min)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.kit.agentproc import Agent, parse_exposition
from tests.kit.realmps import MpsDaemon

HERE = Path(__file__).resolve().parent

# driver 580's wording, as in tests/fixtures/h200-driver580
LINES = {
    # every client logs contexts 0 and 1; one connection is context 0
    "client_connected": ("server.log", r"Client \{PID: \d+, Context(?: ID)?: 0\} connected"),
    "fatal_gpu_error": ("server.log", r"encountered a fatal GPU error"),
    "client_torn_down": ("server.log", r"on device \d+ to be torn down"),
    "new_client_refused": ("server.log", r"Refusing to accept new client"),
    "server_started": ("control.log", r"Starting new server \d+"),
}


def agent_resources(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M)[1])  # noqa: E731
    return {"rss_mib": round(field("VmRSS") / 1024, 2), "threads": field("Threads"),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def count_lines(log_dir: Path, offsets: dict[str, int]) -> dict[str, int]:
    counts = {}
    for event, (name, pattern) in LINES.items():
        path = log_dir / name
        text = path.read_bytes()[offsets.get(name, 0):].decode(errors="replace") if path.exists() else ""
        counts[event] = len(re.findall(pattern, text))
    return counts


def soak(seconds: float, churn_every: float, fault_every: float, out: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mpswatch-soak-"))
    binary = str(root / "mps_client")
    subprocess.run(["nvcc", "-O2", "-o", binary, str(HERE / "mps_client.cu")], check=True, timeout=300)
    mps = MpsDaemon(root / "mps")
    # the daemon takes CUDA_VISIBLE_DEVICES (the GPU to soak on); its clients see that GPU as device 0
    client_env = {k: v for k, v in mps.env.items() if k != "CUDA_VISIBLE_DEVICES"}
    result: dict = {"seconds": seconds, "churn_every_seconds": churn_every, "fault_every_seconds": fault_every}
    scrapes = {"ok": 0, "failed": 0, "latencies": []}
    stop = threading.Event()
    try:
        mps.start()
        logs = str(mps.log_dir)
        with Agent(["--pipe-dir", str(mps.pipe_dir), "--log-dir", logs], log_path=root / "agent.log") as agent:
            time.sleep(3)
            offsets = {name: (mps.log_dir / name).stat().st_size if (mps.log_dir / name).exists() else 0
                       for name in ("server.log", "control.log")}
            samples = [{"t": 0.0, **agent_resources(agent.proc.pid)}]

            def scraper():
                while not stop.wait(1.0):
                    t0 = time.monotonic()
                    try:
                        with urllib.request.urlopen(agent.url + "/metrics", timeout=5) as response:
                            response.read()
                        scrapes["ok"] += 1
                        scrapes["latencies"].append(time.monotonic() - t0)
                    except OSError:
                        scrapes["failed"] += 1

            threading.Thread(target=scraper, daemon=True).start()
            started = time.monotonic()
            next_churn, next_fault, next_sample = started, started + fault_every / 2, started + 10
            running: list[subprocess.Popen] = []
            outcomes: dict[str, int] = {}
            faults = 0
            while time.monotonic() - started < seconds:
                now = time.monotonic()
                if now >= next_churn:
                    running.append(subprocess.Popen([binary, "hold", str(churn_every * 0.6)], env=client_env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                    next_churn += churn_every
                if now >= next_fault:
                    running.append(subprocess.Popen([binary, "fault", "1"], env=client_env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                    faults += 1
                    next_fault += fault_every
                if now >= next_sample:
                    samples.append({"t": round(now - started, 1), **agent_resources(agent.proc.pid)})
                    next_sample += 10
                    out.write_text(json.dumps({**result, "partial": True, "faults_injected": faults,
                                               "client_outcomes": outcomes, "resources": samples,
                                               "scrapes_ok": scrapes["ok"], "scrapes_failed": scrapes["failed"]}))
                for client in [c for c in running if c.poll() is not None]:
                    first = (client.stdout.read().strip().splitlines() or ["(nothing)"])[0]
                    outcome = re.sub(r"\d{3,}", "N", first.split(" ")[0] if first.startswith("ready") else first)
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    running.remove(client)
                time.sleep(0.1)
            for client in running:
                try:
                    client.wait(timeout=30)
                    outcomes["finished after the end"] = outcomes.get("finished after the end", 0) + 1
                except subprocess.TimeoutExpired:
                    client.kill()
                    outcomes["killed after the end (stuck)"] = outcomes.get("killed after the end (stuck)", 0) + 1
            time.sleep(4)  # two log cycles and a control cycle to read the last lines
            samples.append({"t": round(time.monotonic() - started, 1), **agent_resources(agent.proc.pid)})
            stop.set()
            final = parse_exposition(agent.get("/metrics")[1])
            counted = {}
            for (name, labels), value in final.items():
                if name == "mps_log_events_total" and dict(labels)["log_dir"] == logs:
                    counted[dict(labels)["event"]] = counted.get(dict(labels)["event"], 0) + value
            in_logs = count_lines(mps.log_dir, offsets)
            latencies = sorted(scrapes["latencies"])
            result.update({
                "faults_injected": faults,
                "client_outcomes": outcomes,
                "resources": samples,
                "resources_start_end": [samples[0], samples[-1]],
                "scrapes_ok": scrapes["ok"], "scrapes_failed": scrapes["failed"],
                "scrape_p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
                "scrape_max_ms": round(1000 * latencies[-1], 2) if latencies else None,
                "events_in_logs": in_logs,
                "events_counted_by_agent": {e: counted.get(e, 0) for e in in_logs},
                "no_event_lost": all(counted.get(e, 0) == n for e, n in in_logs.items()),
                "read_errors": {f"{dict(l)['source']}/{dict(l)['reason']}": v for (n, l), v in final.items()
                                if n == "mps_log_read_errors_total" and v},
                "collector_errors": {f"{dict(l)['collector']}/{dict(l)['reason']}": v for (n, l), v in final.items()
                                     if n == "mps_exporter_collector_errors_total" and v},
            })
    finally:
        stop.set()
        mps.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--churn-every", type=float, default=3.0, help="a new client every N seconds")
    parser.add_argument("--fault-every", type=float, default=60.0, help="a faulting client every N seconds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = soak(args.seconds, args.churn_every, args.fault_every, Path(args.out))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "resources"}, indent=1))


if __name__ == "__main__":
    main()
