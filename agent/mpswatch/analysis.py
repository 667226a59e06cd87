"""`mpswatch status` and `mpswatch advise`: the collectors' status sections composed into one
report, a verdict (OK / DEGRADED / DOWN) for the node and one reason per daemon, server and client.

The JSON form is a stable schema (docs/status.md); the text form is for reading in five seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from mpswatch.snapshot import NodeSnapshot
from mpswatch.units import UNITS
from mpswatch.verdicts import DOWN, OK, StatusSection, age, worst

SCHEMA = "mpswatch.status/v1"
_SECTION_KEYS = ("daemons", "gpus", "engines", "engine_gpus", "log_dirs", "recent_events")


def health_report(snapshot: NodeSnapshot, version: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    collectors: list[dict[str, Any]] = []
    for name, status in sorted(snapshot.statuses.items()):
        collectors.append(
            {
                "name": name,
                "verdict": OK if status.success else DOWN,
                "reason": "ran" if status.success else f"{status.error_reason}: {status.error_detail}",
                "duration_seconds": status.duration_seconds,
            }
        )
    sections: dict[str, StatusSection] = {}
    for unit in UNITS:
        data = getattr(snapshot, unit.name)
        if data is not None:
            sections[unit.name] = unit.status(data, snapshot.derived, now)
    entries: dict[str, list[dict[str, Any]]] = {key: [] for key in _SECTION_KEYS}
    verdicts: list[str] = [c["verdict"] for c in collectors]
    notes: list[str] = []
    for section in sections.values():
        for key, items in section.entries.items():
            entries[key] += items
        verdicts += section.verdicts
        notes += section.notes
    if not entries["daemons"]:
        verdicts.append(DOWN)
    control = sections.get("mps_control")
    if control is not None and control.summary is not None:
        summary = control.summary
    else:
        failed = next((c for c in collectors if c["name"] == "mps_control"), None)
        summary = f"MPS control collector gave no data: {failed['reason'] if failed else 'it has not run'}"
    return {
        "schema": SCHEMA,
        "version": version,
        "generated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "verdict": worst(verdicts),
        "summary": summary,
        "collectors": collectors,
        "daemons": entries["daemons"],
        "gpus": entries["gpus"],
        "engines": entries["engines"],
        "engine_gpus": entries["engine_gpus"],
        "log_dirs": entries["log_dirs"],
        "recent_events": entries["recent_events"],
        "notes": notes,
    }


def _who(event: dict[str, Any]) -> str:
    parts = []
    if event["client_pid"] is not None:
        parts.append(f"client {event['client_pid']}")
    if event["server_pid"] is not None:
        parts.append(f"server {event['server_pid']}")
    if event["detail"]:
        parts.append(event["detail"])
    return ", ".join(parts) or event["message"][:80]


def _in_pod(entry: dict[str, Any]) -> str:
    return f" (pod {entry['pod']})" if entry["pod"] else ""


def render_text(report: dict[str, Any]) -> str:
    lines = [f"{report['verdict']:<9} mpswatch {report['version']}: {report['summary']}"]
    for c in report["collectors"]:
        if c["verdict"] != OK:
            lines.append(f"{c['verdict']:<9} collector {c['name']}: {c['reason']}")
    for d in report["daemons"]:
        pid = f" (pid {d['pid']})" if d["pid"] is not None else ""
        lines.append(f"{d['verdict']:<9} daemon {d['pipe_dir']}{pid}: {d['reason']}")
        for s in d["servers"]:
            uid = f" uid {s['uid']}" if s["uid"] is not None else ""
            lines.append(f"{s['verdict']:<9}   server {s['pid']}{uid}: {s['reason']}")
            for c in s["clients"]:
                lines.append(f"{c['verdict']:<9}     client {c['pid']}{_in_pod(c)} {c['command']}: {c['reason']}")
    for g in report["gpus"]:
        lines.append(f"{g['verdict']:<9} gpu {g['index']} {g['name'] or ''} ({g['uuid']}): {g['reason']}")
        for x in g["recent_xids"]:
            lines.append(f"{'XID':<9} {age(x['age_seconds']) + ' ago':>9} gpu {g['index']}: XID {x['xid']}, {x['meaning']}")
    by_name = {e["name"]: e for e in report["engines"]}
    for group in report["engine_gpus"]:
        lines.append(f"{group['verdict']:<9} engines on {group['gpu_uuid'] or 'an unknown GPU'}: {group['reason']}")
        for name in group["engines"]:
            e = by_name[name]
            lines.append(f"{e['verdict']:<9}   engine {name}{_in_pod(e)}: {e['reason']}")
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
        "schema": "mpswatch.advise/v1",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpus": [{"gpu_uuid": a.gpu_uuid, "engines": a.engines, "verdict": a.verdict,
                  "gain_estimate": None if a.gain_estimate is None else round(a.gain_estimate, 4),
                  "reasons": list(a.reasons), "recommendations": list(a.recommendations)}
                 for a in snapshot.derived.advice],
        "notes": notes,
    }


def render_advice(report: dict[str, Any]) -> str:
    lines = []
    for g in report["gpus"]:
        estimate = "" if g["gain_estimate"] is None else f" {g['gain_estimate']:+.0%} estimated for two engines under MPS"
        lines.append(f"{g['verdict'] or 'unknown':<14}{g['gpu_uuid']}:{estimate}")
        lines += [f"{'':<14}  because {r}" for r in g["reasons"]]
        lines += [f"{'':<14}  -> {r}" for r in g["recommendations"]]
    lines += [f"{'NOTE':<14}{n}" for n in report["notes"]]
    return "\n".join(lines or ["no GPU with engines"]) + "\n"
