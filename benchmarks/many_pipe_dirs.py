"""A large, hostile set of pipe dirs (issue 17, finding 11): by default 1,000, of which 300 have a
daemon that never answers (each holds a probe worker for the whole command timeout, as a control
program blocked on a hung daemon's socket does), 696 have none (answered at once: `Cannot find MPS
control daemon process`) and 4 are live (the fake control program in replay mode, real processes),
sorted last. The MPS control collector runs at the agent's defaults (2 s interval, 1 s command
timeout) under its scheduler loop, as `mpswatch run` runs it. Per cycle: whether it succeeded, its
duration, the probes deferred, the live daemons' data age; and the cycles until the live daemons are
up and until every daemon has been probed once.

    python -m benchmarks.many_pipe_dirs [--dirs 1000] [--hung 300] [--live 4] [--cycles 15] [--json OUT]

The hanging and absent daemons are answered in-process (no process per probe): this measures the
collector's scheduling, not the cost of 1,000 control-program runs per cycle (about 1.6 ms each on
an H200, docs/validation.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector
from mpswatch.logsetup import configure_logging
from mpswatch.procfs import ProcFS
from mpswatch.runner import RunResult, run_with_deadline
from mpswatch.scheduler import CollectorLoop, SnapshotStore

from tests.kit import fakecontrol
from tests.kit.fakedaemon import FAKE_CONTROL

HEALTHY = {
    "get_server_list": "476\n",
    "get_server_status 476": "ACTIVE\n",
    "get_active_thread_percentage 476": "100.0\n",
    "ps": "PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND\n"
          "437       1         476            GPU-2ea0ea17-0206-eb44    4026531836     python3\n",
    "get_default_active_thread_percentage": "100.0\n",
    "get_default_device_pinned_mem_limit 0": "",
}


def pipe_dirs(root: Path, total: int, hung: int, live: int) -> dict[str, str]:
    kinds = {}
    for i in range(total):
        kind = "live" if i >= total - live else "hung" if i < hung else "dead"
        d = root / f"{'z' if kind == 'live' else 'a'}-{i:05d}"
        d.mkdir()
        kinds[str(d)] = kind
        if kind == "live":
            for command, text in HEALTHY.items():
                fakecontrol.write_reply(d, command, text)
    return kinds


def run(total: int, hung: int, live: int, cycles: int, interval: float, timeout: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mpswatch-many-pipe-dirs-"))
    kinds = pipe_dirs(root, total, hung, live)
    (root / "proc").mkdir()

    def runner(argv, stdin, env, command_timeout, **options):
        kind = kinds[env["CUDA_MPS_PIPE_DIRECTORY"]]
        if kind == "live":
            return run_with_deadline(argv, stdin, env, command_timeout, **options)
        if kind == "hung":
            time.sleep(command_timeout)
            return RunResult(None, "", command_timeout, timed_out=True)
        return RunResult(1, "Cannot find MPS control daemon process\n", 0.002)

    collector = MpsControlCollector(control_bin=FAKE_CONTROL, discovery=DiscoverySettings(pipe_dirs=tuple(kinds)),
                                    interval_seconds=interval, command_timeout_seconds=timeout,
                                    procfs=ProcFS(root / "proc"), runner=runner)
    loop = CollectorLoop(collector, SnapshotStore())
    live_dirs = [d for d, kind in kinds.items() if kind == "live"]
    rows, live_up_at, all_probed_at = [], None, None
    next_run = time.monotonic()
    for cycle in range(1, cycles + 1):
        report = loop.cycle()
        now = time.time()
        data = report.data
        daemons = {d.pipe_dir: d for d in data.daemons} if data is not None else {}
        ages = [now - daemons[d].measured_at for d in live_dirs
                if d in daemons and getattr(daemons[d], "measured_at", None) is not None]
        up = sum(1 for d in live_dirs if d in daemons and daemons[d].up)
        if live_up_at is None and up == len(live_dirs):
            live_up_at = cycle
        if all_probed_at is None and len(daemons) == total:
            all_probed_at = cycle
        rows.append({"cycle": cycle, "success": report.status.success, "reason": report.status.error_reason,
                     "duration_seconds": report.status.duration_seconds, "daemons_with_data": len(daemons),
                     "live_up": up, "deferred": len(getattr(data, "deferred", ())) if data else None,
                     "live_max_age_seconds": round(max(ages), 3) if ages else None})
        next_run += interval
        time.sleep(max(0.0, next_run - time.monotonic()))
    durations = [r["duration_seconds"] for r in rows if r["duration_seconds"] is not None]
    settled = [r["live_max_age_seconds"] for r in rows if live_up_at and r["cycle"] > live_up_at
               and r["live_max_age_seconds"] is not None]
    return {
        "dirs": total, "hung": hung, "live": live, "cycles": cycles, "interval_seconds": interval,
        "command_timeout_seconds": timeout,
        "cycles_succeeded": sum(r["success"] for r in rows),
        "cycle_duration_median_seconds": round(statistics.median(durations), 3) if durations else None,
        "cycle_duration_max_seconds": round(max(durations), 3) if durations else None,
        "live_up_from_cycle": live_up_at, "every_daemon_probed_by_cycle": all_probed_at,
        "live_age_after_up_median_seconds": round(statistics.median(settled), 3) if settled else None,
        "live_age_after_up_max_seconds": round(max(settled), 3) if settled else None,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirs", type=int, default=1000)
    parser.add_argument("--hung", type=int, default=300)
    parser.add_argument("--live", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    configure_logging("error", "json")  # 300 hanging daemons warn once each
    result = run(args.dirs, args.hung, args.live, args.cycles, args.interval, args.timeout)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    for row in result["rows"]:
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
