"""`mpswatch status` and `mpswatch advise`: the collectors' status sections composed into one
report, a verdict (OK / DEGRADED / DOWN) for the node and one reason per daemon, server and client.

The JSON form is a stable schema (docs/status.md); the text form is for reading in five seconds.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from mpswatch.advisor import ModeEstimate
from mpswatch.snapshot import BlastRadius, FaultClient, NodeSnapshot
from mpswatch.units import UNITS
from mpswatch.verdicts import (
    DEGRADED,
    DOWN,
    OK,
    PROBLEM_KINDS,
    StatusSection,
    age,
    event_entry,
    in_pod,
    pod_name,
    problem,
    rank,
    worst,
)

SCHEMA = "mpswatch.status/v1"
_SECTION_KEYS = ("daemons", "gpus", "engines", "engine_gpus", "log_dirs", "recent_events")


def health_report(snapshot: NodeSnapshot, version: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    collectors: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for name, status in sorted(snapshot.statuses.items()):
        collectors.append(
            {
                "name": name,
                "verdict": OK if status.success else DOWN,
                "reason": "ran" if status.success else f"{status.error_reason}: {status.error_detail}",
                "duration_seconds": status.duration_seconds,
            }
        )
        if not status.success:
            problems.append(problem(DOWN, "collector", f"collector {name}", collectors[-1]["reason"]))
    sections: dict[str, StatusSection] = {}
    for unit in UNITS:
        data = getattr(snapshot, unit.name)
        if data is not None:
            sections[unit.name] = unit.status(data, snapshot.derived, now)
    entries: dict[str, list[dict[str, Any]]] = {key: [] for key in _SECTION_KEYS}
    notes: list[str] = []
    two_samples: list[str] = []
    for section in sections.values():
        for key, items in section.entries.items():
            entries[key] += items
        problems += section.problems
        notes += section.notes
        two_samples += section.needs_two_samples
    if two_samples:
        notes.append(f"? for {', '.join(dict.fromkeys(two_samples))}: {ONE_LOOK}")
    blast_radius = [blast_entry(b, now) for b in snapshot.derived.blast_radius]
    problems += [problem(b["verdict"], "fault", f"blast radius of server {b['server_pid']} on {b['pipe_dir']}",
                         b["reason"]) for b in blast_radius]
    control = sections.get("mps_control")
    if control is None and "mps_control" not in snapshot.statuses:
        problems.append(problem(DOWN, "collector", "collector mps_control", "has not run: no MPS data"))
    problems.sort(key=lambda p: (-rank(p["verdict"]), PROBLEM_KINDS.index(p["kind"])))
    if problems:
        more = len(problems) - 1
        summary = f"{problems[0]['subject']}: {problems[0]['reason']}" + (
            f"; {more} more problem{'s' if more > 1 else ''}" if more else "")
    else:  # then the control collector ran, and its section says what it sees
        summary = control.summary if control is not None and control.summary is not None else ""
    expected = snapshot.derived.mps_expected
    return {
        "schema": SCHEMA,
        "version": version,
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "verdict": worst(p["verdict"] for p in problems),
        "summary": summary,
        "problems": problems,
        "blast_radius": blast_radius,
        "mps_expected": None if expected is None else
        {"expected": expected.expected, "reason": expected.reason, "detail": expected.detail},
        "collectors": collectors,
        "daemons": entries["daemons"],
        "gpus": entries["gpus"],
        "engines": entries["engines"],
        "engine_gpus": entries["engine_gpus"],
        "log_dirs": entries["log_dirs"],
        "recent_events": entries["recent_events"],
        "notes": notes,
    }


def _client(client: FaultClient) -> dict[str, Any]:
    return {"pid": client.pid, "engine": client.engine, "pod": pod_name(client.pod)}


def _named(client: FaultClient) -> str:
    """`513`, `513 engine qwen:8000 (pod team-a/vllm-a)`."""
    engine = f" engine {client.engine}" if client.engine else ""
    return f"{client.pid}{engine}{in_pod(pod_name(client.pod))}"


_BLAST_STATE = {"fault": "", "recovered": "FAULT over; ", "gone": "server gone; "}


def blast_entry(blast: BlastRadius, now: float) -> dict[str, Any]:
    """One server's fault or death as `blast_radius` lists it, with its problem line's reason: the
    client MPS blames (worded as MPS's claim: it can blame an innocent client), then every client that
    shared the server, whether it is still attached and where it came back."""
    blamed = blast.blamed
    if blamed is not None and blast.fatal_error is not None:
        when = age(now - blast.fatal_error[1].time)
        blame = (f"MPS blames client {_named(blamed.client)} for a fatal GPU error {when} ago "
                 "(MPS can blame an innocent client)")
    else:
        blame = "the MPS log names no client"
    clients = []
    for shared in blast.clients:
        where = {True: "still attached", False: "gone", None: "attachment unknown"}[shared.attached]
        if shared.back_on is not None:
            where += f", back on server {shared.back_on.server_pid} as {_named(shared.back_on.client)}"
        clients.append(f"{_named(shared.client)} {where}")
    n = len(blast.clients)
    shared_by = f"{n} client{'' if n == 1 else 's'} shared the server: {', '.join(clients)}" if clients else \
        "no client is known to have shared the server"
    return {
        "pipe_dir": blast.pipe_dir,
        "server_pid": blast.server_pid,
        "state": blast.state,
        "verdict": DOWN if blast.state == "fault" else DEGRADED,
        "reason": f"{_BLAST_STATE[blast.state]}{blame}; {shared_by}",
        "blamed": None if blamed is None else _client(blamed.client),
        "fatal_error": None if blast.fatal_error is None else event_entry(*blast.fatal_error, now),
        "clients": [
            {**_client(c.client), "blamed": c.blamed, "attached": c.attached,
             "back_on": None if c.back_on is None else {"pipe_dir": c.back_on.pipe_dir, "server_pid": c.back_on.server_pid,
                                                         **_client(c.back_on.client), "by": c.back_on.by}}
            for c in blast.clients
        ],
    }


# why a figure is `?` in a one-shot report, said once
ONE_LOOK = "needs two samples, and `mpswatch status` looks once (`--agent URL` asks the running agent)"


def _who(event: dict[str, Any]) -> str:
    parts = []
    if event["client_pid"] is not None:
        parts.append(f"client {event['client_pid']}")
    if event["server_pid"] is not None:
        parts.append(f"server {event['server_pid']}")
    if event["detail"]:
        parts.append(event["detail"])
    return ", ".join(parts) or event["message"][:80]


def _clients(n: int) -> str:
    return f"{n} client{'' if n == 1 else 's'}"


def render_text(report: dict[str, Any]) -> str:
    """Problems first: the summary line names the worst, then one line per problem, DOWN before
    DEGRADED; then what is healthy, a server's healthy clients as one count line; then log events
    and XIDs, newest first, and notes."""
    lines = [f"{report['verdict']:<9} mpswatch {report['version']}: {report['summary']}"]
    lines += [f"{p['verdict']:<9} {p['subject']}: {p['reason']}" for p in report["problems"]]
    for d in report["daemons"]:
        if d["verdict"] == OK:
            pid = f" (pid {d['pid']})" if d["pid"] is not None else ""
            lines.append(f"{OK:<9} daemon {d['pipe_dir']}{pid}: {d['reason']}")
        for s in d["servers"]:
            healthy = sum(1 for c in s["clients"] if c["verdict"] == OK)
            if s["verdict"] == OK:
                uid = f" uid {s['uid']}" if s["uid"] is not None else ""
                lines.append(f"{OK:<9}   server {s['pid']}{uid}: {s['reason']}")
                if healthy:
                    lines.append(f"{OK:<9}     {_clients(healthy)} connected")
            elif healthy:
                lines.append(f"{OK:<9}   {_clients(healthy)} of server {s['pid']} connected")
    for g in report["gpus"]:
        if g["verdict"] == OK:
            lines.append(f"{OK:<9} gpu {g['index']} {g['name'] or ''} ({g['uuid']}): {g['reason']}")
    by_name = {e["name"]: e for e in report["engines"]}
    for group in report["engine_gpus"]:
        where = group["gpu_uuid"] or "an unknown GPU"
        if group["verdict"] == OK:
            lines.append(f"{OK:<9} engines on {where}: {group['reason']}")
        for name in group["engines"]:
            e = by_name[name]
            if e["verdict"] == OK:  # under its group's line, or on its own when the group is a problem
                pod = in_pod(e["pod"])
                line = f"  engine {name}{pod}" if group["verdict"] == OK else f"engine {name}{pod} on {where}"
                lines.append(f"{OK:<9} {line}: {e['reason']}")
    for g in report["gpus"]:
        for x in g["recent_xids"]:
            lines.append(f"{'XID':<9} {age(x['age_seconds']) + ' ago':>9} gpu {g['index']}: XID {x['xid']}, {x['meaning']}")
    for e in report["recent_events"]:
        lines.append(f"{'EVENT':<9} {age(e['age_seconds']) + ' ago':>9} {e['event']}: {_who(e)} ({e['log_dir']})")
    for note in report["notes"]:
        lines.append(f"{'NOTE':<9} {note}")
    return "\n".join(lines) + "\n"


def advice_report(snapshot: NodeSnapshot) -> dict[str, Any]:
    """`mpswatch advise --json`: one entry per GPU with engines."""
    notes = []
    if snapshot.gpu is None:
        notes.append("no GPU data (NVML unavailable?): the advice needs each engine's GPU")
    if snapshot.engines is None or not snapshot.engines.engines:
        notes.append("no engines found: nothing to advise on")
    if snapshot.engines is not None and any(e.gpu_uuid is None for e in snapshot.derived.engines):
        notes.append("engines on an unknown GPU are left out (their GPU process is not seen)")
    return {
        "schema": "mpswatch.advise/v2",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpus": [{"gpu_uuid": a.gpu_uuid, "engines": a.engines, "verdict": a.verdict,
                  "gain_estimate": None if a.gain_estimate is None else round(a.gain_estimate, 4),
                  "best_mode": a.best_mode, "options": [_option(o) for o in a.options],
                  "reasons": list(a.reasons), "recommendations": list(a.recommendations)}
                 for a in snapshot.derived.advice],
        "notes": notes,
    }


def _option(option: ModeEstimate) -> dict[str, Any]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {"mode": option.mode, "gain_estimate": rounded(option.gain), "held_out_error_pp": option.error_pp,
            "itl_p50_ratio": rounded(option.itl_p50_ratio), "itl_p99_ratio": rounded(option.itl_p99_ratio),
            "ttft_p50_ratio": rounded(option.ttft_p50_ratio), "ttft_p99_ratio": rounded(option.ttft_p99_ratio),
            "split": option.split, "latency_measured_in": None if option.measured_in is None else {
                "params_billion": option.measured_in.params_billion, "context": option.measured_in.context,
                "workload": "prefill" if option.measured_in.prefill else "decode",
                "busy_alone": option.measured_in.busy_alone, "cpu_work_ms": option.measured_in.cpu_work_ms}}


def render_advice(report: dict[str, Any]) -> str:
    lines = []
    for g in report["gpus"]:
        estimate = "" if g["gain_estimate"] is None else f" {g['gain_estimate']:+.0%} estimated for two engines under MPS"
        best = "" if g["best_mode"] is None else f"; best for throughput: {g['best_mode']}"
        lines.append(f"{g['verdict'] or 'unknown':<14}{g['gpu_uuid']}:{estimate}{best}")
        lines += [f"{'':<14}  because {r}" for r in g["reasons"]]
        for o in g["options"]:
            error = "" if o["held_out_error_pp"] is None else f" (held-out error up to {o['held_out_error_pp']:g} pp)"
            latency = ("ITL price not measured" if o["itl_p50_ratio"] is None or o["itl_p99_ratio"] is None
                       else f"ITL x{o['itl_p50_ratio']:.2f} p50, x{o['itl_p99_ratio']:.2f} p99")
            if o["ttft_p50_ratio"] is not None and o["ttft_p99_ratio"] is not None:
                latency += f", TTFT x{o['ttft_p50_ratio']:.2f} p50, x{o['ttft_p99_ratio']:.2f} p99"
            name = o["mode"] + (f" {o['split']}" if o["split"] else "")
            lines.append(f"{'':<14}  {name:<24} {o['gain_estimate']:+.0%}{error}, {latency}")
        lines += [f"{'':<14}  -> {r}" for r in g["recommendations"]]
    lines += [f"{'NOTE':<14}{n}" for n in report["notes"]]
    return "\n".join(lines or ["no GPU with engines"]) + "\n"
