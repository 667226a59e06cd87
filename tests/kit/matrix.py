"""The fault matrix's record: one row per case (what was done, what the agent reported, time to
detect, pass/fail) and a recording of the agent's series, so that the shipped alert rules can be
evaluated by promtool on what the agent really exported (tests/test_matrix_alerts.py)."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.kit.agentproc import parse_exposition

RECORDED_PREFIXES = ("mps_", "mps_exporter_collector_success")


class Recorder:
    """Scrapes an agent every `every` seconds in the background; keeps each series' points."""

    def __init__(self, url: str, every: float = 0.5) -> None:
        self._url = url
        self._every = every
        self.started = time.monotonic()
        self.series: dict[tuple[str, frozenset], list[list[float]]] = {}
        self.failed_scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="recorder")
        self._thread.start()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            t = self.now()
            try:
                with urllib.request.urlopen(self._url + "/metrics", timeout=2) as response:
                    samples = parse_exposition(response.read().decode())
            except OSError:
                self.failed_scrapes += 1
                continue
            for key, value in samples.items():
                if key[0].startswith(RECORDED_PREFIXES) and not key[0].endswith("_created"):
                    self.series.setdefault(key, []).append([t, value])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        return {
            "failed_scrapes": self.failed_scrapes,
            "series": [{"name": n, "labels": dict(sorted(l)), "points": p} for (n, l), p in sorted(self.series.items(), key=str)],
        }


@dataclass
class Case:
    """One row of the matrix. `alerts`: (alert name, seconds into the recording at which its
    expression must hold); `quiet`: (alert name, seconds at which it must not)."""

    name: str
    done: str
    reported: dict = field(default_factory=dict)
    detect_seconds: dict = field(default_factory=dict)
    status_verdict: str | None = None
    alerts: list = field(default_factory=list)
    quiet: list = field(default_factory=list)
    passed: bool = False
    recording: dict | None = None
    notes: list = field(default_factory=list)
    _recorder: Recorder | None = None

    def record(self, agent) -> Recorder:
        self._recorder = Recorder(agent.url)
        return self._recorder

    def at(self) -> float:
        """Seconds into this case's recording."""
        assert self._recorder is not None, "record(agent) first"
        return self._recorder.now()

    def expect_alert(self, alert: str, at: float | None = None) -> None:
        self.alerts.append([alert, self.at() if at is None else at])

    def expect_quiet(self, alert: str, at: float | None = None) -> None:
        """Checked at a whole second the recording already covers (not before its first scrapes)."""
        if at is None:
            while self.at() < 2.5:
                time.sleep(0.1)
            at = self.at() - 0.6
        self.quiet.append([alert, at])

    def finish_recording(self) -> None:
        if self._recorder is not None:
            time.sleep(1.1)  # the recorder's last scrape covers the final state
            self.recording = self._recorder.stop()
            self._recorder = None

    def as_dict(self) -> dict:
        self.finish_recording()
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class Matrix:
    def __init__(self) -> None:
        self.cases: list[Case] = []

    def case(self, name: str, done: str) -> Case:
        case = Case(name, done)
        self.cases.append(case)
        return case

    def save(self, path: str | Path, meta: dict) -> None:
        with open(path, "w") as handle:
            json.dump({**meta, "cases": [c.as_dict() for c in self.cases]}, handle, indent=1, sort_keys=True, default=str)


def _series_selector(name: str, labels: dict) -> str:
    quoted = ",".join(f'{k}={json.dumps(v)}' for k, v in sorted({**labels, "instance": "node", "job": "mpswatch"}.items()))
    return f"{name}{{{quoted}}}"


def _values(points: list[list[float]], steps: int) -> str:
    """Points resampled on a 1 s grid (the last value at or before each second), `_` where none."""
    out, i, last = [], 0, None
    for second in range(steps):
        while i < len(points) and points[i][0] <= second + 1e-9:
            last = points[i][1]
            i += 1
        if last is None or points[i - 1][0] < second - 1.5:  # no scrape close enough: missing
            out.append("_")
        else:
            out.append(repr(float(last)))
    return " ".join(out)


def promtool_test(case: dict, rules_path: str, alert_exprs: dict[str, str]) -> dict:
    """A `promtool test rules` file that evaluates each expected alert's expression on the
    recording: it must return series where the case expects the alert, and none where quiet."""
    recording = case["recording"]
    last = max((p[0] for s in recording["series"] for p in s["points"]), default=0.0)
    steps = int(last) + 2
    tests = []
    for alert, at in case["alerts"]:
        # +2: the change may reach the recording up to a scrape (0.5 s and its duration) after `at`
        tests.append({"expr": f"count({alert_exprs[alert]}) > bool 0", "eval_time": f"{int(at) + 2}s",
                      "exp_samples": [{"labels": "{}", "value": 1}]})
    for alert, at in case["quiet"]:
        tests.append({"expr": f"count({alert_exprs[alert]}) > bool 0", "eval_time": f"{int(at)}s", "exp_samples": []})
    return {
        "rule_files": [rules_path],
        "evaluation_interval": "1s",
        "tests": [{
            "interval": "1s",
            "input_series": [{"series": _series_selector(s["name"], s["labels"]), "values": _values(s["points"], steps)}
                             for s in recording["series"]],
            "promql_expr_test": tests,
        }],
    }


def load_run(path: str | Path) -> dict:
    """A run as tests/gpu writes it ($MPSWATCH_GPU_MATRIX_RESULTS, .json) or as committed, gzipped
    (tests/fixtures/h200-matrix/*.json.gz); one recorded before issue 20's renames is read in the
    names of now (docs/metrics.md, "Renamed")."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        run = json.load(handle)
    for case in run["cases"]:
        case["alerts"] = [[ALERTS_RENAMED.get(alert, alert), at] for alert, at in case["alerts"]]
        case["quiet"] = [[ALERTS_RENAMED.get(alert, alert), at] for alert, at in case["quiet"]]
        if case.get("recording"):
            case["recording"]["series"] = renamed_series(case["recording"]["series"])
    return run


# issue 20's renames, as a recording made before them needs them
ALERTS_RENAMED = {
    "MpswatchTargetDown": "MPSWatchTargetDown", "MpswatchCollectorFailing": "MPSWatchCollectorFailing",
    "MpswatchCollectorStale": "MPSWatchCollectorStale", "MpswatchAbsent": "MPSWatchAbsent",
    "MpswatchCannotRunMPSControl": "MPSWatchCannotRunMPSControl", "GPUCriticalXid": "MPSGPUCriticalXid",
    "GPUMemoryNearlyFull": "MPSGPUMemoryNearlyFull",
}
_PERCENTAGES = {"mps_server_active_thread_percentage": "mps_server_active_thread_ratio",
                "mps_default_active_thread_percentage": "mps_default_active_thread_ratio"}
_SERVER_SERIES = {"mps_server_status", "mps_server_active_thread_ratio", "mps_server_clients",
                  "mps_server_started_before_limits", "mps_clients"}


def renamed_series(series: list[dict]) -> list[dict]:
    """Series recorded under the names and labels of before issue 20, in those of now: one prefix,
    ratios, `gpu_uuid` alone on GPU series, servers by (pipe_dir, uid), GPU memory by kind and by
    engine. Series that come to share a name and labels (two servers of one user, a GPU's processes)
    are merged point by point: summed for memory, the highest value otherwise."""
    uids = {(s["labels"]["pipe_dir"], s["labels"]["server_pid"]): s["labels"].get("uid", "")
            for s in series if s["name"] == "mps_server_info"}
    merged: dict[tuple[str, tuple], dict[float, float]] = {}
    summed: set[str] = set()
    for one in series:
        name, labels, points = one["name"], dict(one["labels"]), one["points"]
        if name.startswith("mpswatch_"):
            name = "mps_exporter_" + name.removeprefix("mpswatch_")
        if name in _PERCENTAGES:
            name, points = _PERCENTAGES[name], [[t, v / 100] for t, v in points]
        if "uuid" in labels:
            labels["gpu_uuid"] = labels.pop("uuid")
            if name != "mps_gpu_info":
                labels.pop("gpu", None)
        if name in _SERVER_SERIES and "server_pid" in labels:
            labels["uid"] = uids.get((labels["pipe_dir"], labels.pop("server_pid")), "")
        targets = [(name, labels)]
        if name == "mps_gpu_process_memory_bytes":
            targets = [("mps_gpu_memory_by_kind_bytes", {"gpu_uuid": labels["gpu_uuid"], "kind": labels["kind"]})]
            if labels.get("engine"):
                targets.append(("mps_engine_gpu_memory_bytes", {"engine": labels["engine"], "gpu_uuid": labels["gpu_uuid"]}))
            summed.update(target for target, _ in targets)
        for target, target_labels in targets:
            into = merged.setdefault((target, tuple(sorted(target_labels.items()))), {})
            for t, v in points:
                into[t] = into[t] + v if t in into and target in summed else max(v, into.get(t, v))
    return [{"name": name, "labels": dict(labels), "points": [[t, v] for t, v in sorted(points.items())]}
            for (name, labels), points in merged.items()]


def markdown_table(run: dict) -> str:
    """docs/validation.md's table: one row per case."""
    rows = ["| case | what was done | what the agent reported | time to detect | alert (promtool on the recording) | result |",
            "|---|---|---|---|---|---|"]
    for case in run["cases"]:
        reported = "; ".join(f"{k}: {_short(v)}" for k, v in case["reported"].items())
        if case.get("status_verdict"):
            reported = f"`status` {case['status_verdict']}; {reported}"
        detect = "; ".join(f"{k}: {v} s" for k, v in case["detect_seconds"].items()) or "–"
        alerts = ", ".join(a for a, _ in case["alerts"]) or "none expected"
        quiet = ", ".join(sorted({a for a, _ in case["quiet"]}))
        if quiet:
            alerts += f" (quiet before/otherwise: {quiet})"
        rows.append(f"| {case['name']} | {case['done']} | {_cell(reported)} | {_cell(detect)} | {alerts} | "
                    f"{'pass' if case['passed'] else '**fail**'} |")
    return "\n".join(rows) + "\n"


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    import sys

    print(markdown_table(load_run(sys.argv[1])))
