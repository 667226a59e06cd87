"""One Prometheus in front of a fleet of mpswatch nodes, measured (issue 20; docs/fleet.md).

Real expositions of staged nodes (the agent's own collectors, tests.kit.stagednode) in a few
states, served under NODES node names from a few processes on loopback (tests.kit.fleet); Prometheus
scrapes every node as its own `instance` at INTERVAL and remote-writes to VictoriaMetrics, where
vmalert evaluates the fleet rules (alerts/mpswatch-fleet.rules.yml) at the same interval. After a
warm-up, over the measured window: series per node and in total, samples per second, Prometheus's
and VictoriaMetrics's memory and CPU, the scrapes' durations, the rules' evaluation time, and each
fleet dashboard query timed against VictoriaMetrics (instant queries; the time series panels also
as range queries over the window), p50/p99.

    python -m benchmarks.fleet [--nodes 1000] [--interval 15s] [--warmup 150] [--window 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mpswatch.logsetup import configure_logging

from tests.kit import fleet
from tests.kit.agentproc import REPO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# an 8-GPU server with two engines a GPU (six MPS clients each), and the large staged node
SHAPES = {"8gpu": (8, 6, 16), "large": (8, 48, 16)}
SHARES = {"8gpu-healthy": 0.75, "8gpu-fault": 0.05, "8gpu-daemon-down": 0.05, "large-healthy": 0.1, "large-fault": 0.05}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def scalar(stack: fleet.FleetStack, base: str, expr: str) -> float | None:
    result = stack.query(base, expr)
    return float(result[0]["value"][1]) if result else None


def metric_sum(url: str, name: str, label_filter: str = "") -> float:
    """The sum of a metric's samples in a /metrics page (VictoriaMetrics's, vmalert's)."""
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and label_filter in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def timed_queries(stack: fleet.FleetStack, start: float, end: float, step: int, rounds: int) -> list[dict]:
    dashboard = json.loads((REPO / "dashboards" / "fleet.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        for target in panel["targets"]:
            expr = re.sub(r"\$\w+", ".*", target["expr"])
            kinds = [("instant", {"query": expr})]
            if panel["type"] == "timeseries":
                kinds.append(("range", {"query": expr, "start": f"{start:.0f}", "end": f"{end:.0f}", "step": str(step)}))
            for kind, params in kinds:
                path = "/api/v1/query" if kind == "instant" else "/api/v1/query_range"
                times = []
                series = 0
                for _ in range(rounds):
                    began = time.perf_counter()
                    with urllib.request.urlopen(f"{stack.victoria}{path}?" + urllib.parse.urlencode(params), timeout=60) as answer:
                        reply = json.loads(answer.read())
                    times.append(time.perf_counter() - began)
                    series = len(reply["data"]["result"])
                times.sort()
                out.append({"panel": panel["title"], "ref": target["refId"], "kind": kind, "series": series,
                            "p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))]})
    return out


def measure(nodes: int, interval: str, warmup: float, window: float, rounds: int) -> dict:
    configure_logging("error", "json")
    templates: dict[str, bytes] = {}
    for name, shape in SHAPES.items():
        templates.update(fleet.capture_states(shape, name))
    templates = {state: body for state, body in templates.items() if state in SHARES}
    assignment = fleet.assign(nodes, SHARES, clusters=4)
    work = Path(tempfile.mkdtemp(prefix="mpswatch-fleet-"))
    stack = fleet.FleetStack(work, templates, assignment, servers=4, scrape_interval=interval, rule_interval=interval)
    try:
        pids = {name: p.pid for name, p in stack.processes.items()}
        time.sleep(warmup)
        started = time.time()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        appended0 = metric_sum(f"{stack.prometheus}/metrics", "prometheus_tsdb_head_samples_appended_total")
        rows0 = metric_sum(f"{stack.victoria}/metrics", "vm_rows_inserted_total")
        rss_samples: dict[str, list[int]] = {name: [] for name in pids}
        while time.time() - started < window:
            for name, pid in pids.items():
                rss_samples[name].append(rss_bytes(pid))
            time.sleep(5)
        elapsed = time.time() - started
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / elapsed for name, pid in pids.items()}
        appended = metric_sum(f"{stack.prometheus}/metrics", "prometheus_tsdb_head_samples_appended_total") - appended0
        rows = metric_sum(f"{stack.victoria}/metrics", "vm_rows_inserted_total") - rows0
        head_series = metric_sum(f"{stack.prometheus}/metrics", "prometheus_tsdb_head_series")
        up = scalar(stack, stack.prometheus, 'sum(up{job="mpswatch"})')
        per_node = {state: len([line for line in body.decode().splitlines() if line and not line.startswith("#")])
                    for state, body in templates.items()}
        scrape = {q: scalar(stack, stack.prometheus, f'{q}(scrape_duration_seconds{{job="mpswatch"}})') for q in ("avg", "max")}
        rule_sum = metric_sum(f"{stack.vmalert}/metrics", "vmalert_iteration_duration_seconds_sum")
        rule_count = metric_sum(f"{stack.vmalert}/metrics", "vmalert_iteration_duration_seconds_count")
        remote_pending = metric_sum(f"{stack.prometheus}/metrics", "prometheus_remote_storage_samples_pending")
        remote_failed = metric_sum(f"{stack.prometheus}/metrics", "prometheus_remote_storage_samples_failed_total")
        queries = timed_queries(stack, started, started + elapsed, int(interval.rstrip("s")), rounds)
        rss = {name: {"first": values[0], "max": max(values), "last": values[-1]} for name, values in rss_samples.items()}
        return {
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "nodes": nodes, "interval": interval,
            "warmup_seconds": warmup, "window_seconds": round(elapsed), "shares": SHARES, "series_per_state": per_node,
            "series_per_node_mean": sum(per_node[a["state"]] for a in assignment.values()) / nodes,
            "targets_up": up, "prometheus_head_series": head_series,
            "prometheus_samples_per_second": appended / elapsed, "victoria_rows_per_second": rows / elapsed,
            "remote_write_samples_pending": remote_pending, "remote_write_samples_failed": remote_failed,
            "rss_bytes": rss, "cpu_cores": cpu, "scrape_duration_seconds": scrape,
            "rule_evaluation_seconds_mean": rule_sum / rule_count if rule_count else None,
            "queries": queries,
        }
    finally:
        stack.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--interval", default="15s")
    parser.add_argument("--warmup", type=float, default=150)
    parser.add_argument("--window", type=float, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    for program in ("PROMETHEUS", "VICTORIA_METRICS", "VMALERT"):
        if getattr(fleet, program) is None:
            print(f"needs {program.lower().replace('_', '-')} (Debian packages prometheus, victoria-metrics)", file=sys.stderr)
            return 2
    result = measure(args.nodes, args.interval, args.warmup, args.window, args.rounds)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
