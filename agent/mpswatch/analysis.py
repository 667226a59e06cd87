"""Verdicts for people on call: OK / DEGRADED / DOWN and one reason per daemon, server and client.

The JSON form is a stable schema (docs/status.md); the text form is for reading in five seconds.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from mpswatch.snapshot import MpsControlData, MpsDaemon, MpsServer, NodeSnapshot

SCHEMA = "mpswatch.status/v1"
OK, DEGRADED, DOWN = "OK", "DEGRADED", "DOWN"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}


def worst(verdicts) -> str:
    return max(verdicts, key=_RANK.__getitem__, default=OK)


def _server_entry(daemon: MpsDaemon, server: MpsServer) -> dict[str, Any]:
    clients = [c for c in daemon.clients if c.server_pid == server.pid]
    counts = {device: n for (spid, device), n in daemon.clients_per_device().items() if spid == server.pid}
    full = sorted(device for device, n in counts.items() if n >= daemon.client_limit)
    if server.status == "FAULT":
        verdict, reason = DOWN, "FAULT: a client hit a fatal GPU error; new clients are refused until every affected client exits"
    elif server.status is None:
        verdict, reason = DEGRADED, "status unknown: get_server_status gave no answer"
    elif server.status == "INITIALIZING":
        verdict, reason = DEGRADED, "INITIALIZING: not yet serving clients"
    elif full:
        verdict = DEGRADED
        reason = f"{counts[full[0]]}/{daemon.client_limit} clients on {', '.join(full)}: the next client will be refused"
    else:
        per_device = ", ".join(f"{n}/{daemon.client_limit} on {device}" for device, n in sorted(counts.items()))
        verdict, reason = OK, f"{server.status}; clients {per_device or 'none'}"
    client_entries = []
    for client in clients:
        if server.status == "FAULT":
            c_verdict, c_reason = DEGRADED, f"server {server.pid} is in FAULT: this client must exit before it recovers"
        else:
            c_verdict, c_reason = OK, f"connected to server {server.pid} on {client.device}"
        client_entries.append(
            {
                "pid": client.pid,
                "client_id": client.client_id,
                "device": client.device,
                "command": client.command,
                "verdict": c_verdict,
                "reason": c_reason,
            }
        )
    return {
        "pid": server.pid,
        "uid": server.uid,
        "status": server.status,
        "active_thread_percentage": server.active_thread_percentage,
        "clients_per_device": counts,
        "verdict": verdict,
        "reason": reason,
        "clients": client_entries,
    }


def _daemon_entry(daemon: MpsDaemon) -> dict[str, Any]:
    servers = [_server_entry(daemon, s) for s in daemon.servers]
    known = {s.pid for s in daemon.servers}
    for server_pid in sorted({c.server_pid for c in daemon.clients} - known):
        servers.append(_server_entry(daemon, MpsServer(server_pid, None, None, None)))
    return {
        "pipe_dir": daemon.pipe_dir,
        "found_by": daemon.found_by,
        "pid": daemon.pid,
        "state": daemon.state.value,
        "client_limit": daemon.client_limit,
        "default_active_thread_percentage": daemon.default_active_thread_percentage,
        "default_pinned_memory_limit_bytes": daemon.default_pinned_memory_limit_bytes,
        "verdict": OK if daemon.up else DOWN,
        "reason": daemon.reason,
        "servers": servers,
    }


def health_report(snapshot: NodeSnapshot, version: str, now: datetime | None = None) -> dict[str, Any]:
    collectors = []
    for name, report in sorted(snapshot.reports.items()):
        status = report.status
        collectors.append(
            {
                "name": name,
                "verdict": OK if status.success else DOWN,
                "reason": "ran" if status.success else f"{status.error_reason}: {status.error_detail}",
                "duration_seconds": status.duration_seconds,
            }
        )
    control = snapshot.data("mps_control")
    daemons = [_daemon_entry(d) for d in control.daemons] if isinstance(control, MpsControlData) else []
    notes = list(control.discovery_notes) if isinstance(control, MpsControlData) else []
    verdicts = [c["verdict"] for c in collectors]
    for d in daemons:
        verdicts.append(d["verdict"])
        for s in d["servers"]:
            verdicts += [s["verdict"], *(c["verdict"] for c in s["clients"])]
    if isinstance(control, MpsControlData) and not daemons:
        verdicts.append(DOWN)
        summary = f"no MPS control daemon found; looked in {', '.join(control.searched)}"
    else:
        servers = sum(len(d["servers"]) for d in daemons)
        clients = sum(len(s["clients"]) for d in daemons for s in d["servers"])
        up = sum(1 for d in daemons if d["state"] == "up")
        summary = f"{len(daemons)} control daemon(s), {up} answering; {servers} server(s); {clients} client(s)"
    return {
        "schema": SCHEMA,
        "version": version,
        "generated_at": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
        "verdict": worst(verdicts),
        "summary": summary,
        "collectors": collectors,
        "daemons": daemons,
        "notes": notes,
    }


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
                lines.append(f"{c['verdict']:<9}     client {c['pid']} {c['command']}: {c['reason']}")
    for note in report["notes"]:
        lines.append(f"{'NOTE':<9} {note}")
    return "\n".join(lines) + "\n"
