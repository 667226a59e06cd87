"""Verdicts for people on call: OK / DEGRADED / DOWN and one reason per daemon, server and client.

The JSON form is a stable schema (docs/status.md); the text form is for reading in five seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from mpswatch.advisor import advise_node
from mpswatch.collectors.gpu import XID_MEANINGS
from mpswatch.snapshot import (
    EngineState,
    EnginesData,
    GpuData,
    GpuState,
    LogEvent,
    MpsControlData,
    MpsDaemon,
    MpsLogsData,
    MpsServer,
    NodeSnapshot,
)

SCHEMA = "mpswatch.status/v1"
OK, DEGRADED, DOWN = "OK", "DEGRADED", "DOWN"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}
RECENT_EVENTS_SHOWN = 10


def worst(verdicts) -> str:
    return max(verdicts, key=_RANK.__getitem__, default=OK)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _event_entry(log_dir: str, event: LogEvent, now: float) -> dict[str, Any]:
    return {
        "log_dir": log_dir,
        "event": event.event,
        "source": event.source,
        "time": datetime.fromtimestamp(event.time, timezone.utc).isoformat(timespec="seconds"),
        "age_seconds": round(now - event.time, 1),
        "server_pid": event.server_pid,
        "client_pid": event.client_pid,
        "detail": event.detail,
        "message": event.message,
    }


def _server_verdict(daemon: MpsDaemon, server: MpsServer, listed: bool, counts: dict[str, int]) -> tuple[str, str]:
    full = sorted(device for device, n in counts.items() if n >= daemon.client_limit)
    if server.status == "FAULT":
        return DOWN, "FAULT: a client hit a fatal GPU error; new clients are refused until every affected client exits"
    if not listed:
        return DEGRADED, "has clients in `ps` but is not in get_server_list (starting or exiting)"
    if server.status is None:
        return DEGRADED, "status unknown: get_server_status gave no usable answer"
    if server.status == "INITIALIZING":
        return DEGRADED, "INITIALIZING: not yet serving clients"
    if daemon.clients is None:
        return DEGRADED, f"{server.status}; client list unavailable (`ps` gave no usable answer)"
    if full:
        return DEGRADED, f"{counts[full[0]]}/{daemon.client_limit} clients on {', '.join(full)}: the next client will be refused"
    per_device = ", ".join(f"{n}/{daemon.client_limit} on {device}" for device, n in sorted(counts.items()))
    return OK, f"{server.status}; clients {per_device or 'none'}"


def _server_entry(
    daemon: MpsDaemon, server: MpsServer, listed: bool, logs: MpsLogsData | None, now: float
) -> dict[str, Any]:
    counts = {device: n for (spid, device), n in daemon.clients_per_device().items() if spid == server.pid}
    verdict, reason = _server_verdict(daemon, server, listed, counts)
    fault_cause = None
    if server.status == "FAULT" and logs is not None:
        cause = logs.last_fatal_error(server.pid)
        if cause is not None:
            fault_cause = _event_entry(*cause, now)
            reason += f"; logged {_age(now - cause[1].time)} ago: client {cause[1].client_pid} encountered a fatal GPU error"
    client_entries = []
    for client in (c for c in daemon.clients or () if c.server_pid == server.pid):
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
        "fault_cause": fault_cause,
        "verdict": verdict,
        "reason": reason,
        "clients": client_entries,
    }


def _daemon_entry(daemon: MpsDaemon, logs: MpsLogsData | None, now: float) -> dict[str, Any]:
    servers = [_server_entry(daemon, s, True, logs, now) for s in daemon.servers]
    listed = {s.pid for s in daemon.servers}
    for server_pid in sorted({c.server_pid for c in daemon.clients or ()} - listed):
        servers.append(_server_entry(daemon, MpsServer(server_pid, None, None, None), False, logs, now))
    return {
        "pipe_dir": daemon.pipe_dir,
        "found_by": daemon.found_by,
        "pid": daemon.pid,
        "state": daemon.state.value,
        "client_limit": daemon.client_limit,
        "orphaned_server_pids": None if daemon.orphaned_server_pids is None else list(daemon.orphaned_server_pids),
        "default_active_thread_percentage": daemon.default_active_thread_percentage,
        "default_pinned_memory_limit_bytes": daemon.default_pinned_memory_limit_bytes,
        "verdict": OK if daemon.up else DOWN,
        "reason": daemon.reason,
        "servers": servers,
    }


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value * 100:.0f}%"


def _gpu_entry(gpu: GpuState, now: float, recent_xids) -> dict[str, Any]:
    processes = [{"pid": p.pid, "kind": p.kind, "memory_bytes": p.memory_bytes} for p in gpu.processes or ()]
    servers = [p["pid"] for p in processes if p["kind"] == "mps_server"]
    alone = [p["pid"] for p in processes if p["kind"] == "exclusive"]
    kinds = {kind: sum(1 for p in processes if p["kind"] == kind) for kind in ("mps_client", "mps_server", "exclusive")}
    if not gpu.gpm_supported:
        activity = "no GPM on this GPU: coarse utilisation only"
    elif gpu.sm_active_ratio is None:
        activity = "GPM from the second cycle on"
    else:
        activity = f"SM active {_percent(gpu.sm_active_ratio)}, DRAM bandwidth {_percent(gpu.dram_bandwidth_ratio)}"
    used = f"{(gpu.memory_used_bytes or 0) / 2**30:.1f}/{(gpu.memory_total_bytes or 0) / 2**30:.0f} GiB"
    summary = (f"utilisation {_percent(gpu.utilization_ratio)}, {activity}, memory {used}; "
               f"{kinds['mps_client']} MPS client(s), {kinds['mps_server']} server(s), {kinds['exclusive']} without MPS")
    if not gpu.up:
        verdict, reason = DOWN, f"NVML calls fail: {gpu.error}"
    elif servers and alone:
        verdict = DEGRADED
        reason = (f"process(es) {', '.join(map(str, alone))} run on this GPU without MPS while MPS server "
                  f"{servers[0]} serves it; {summary}")
    else:
        verdict, reason = OK, summary
    xids = [
        {"xid": e.xid, "meaning": XID_MEANINGS.get(e.xid, "see NVIDIA's XID catalog"),
         "time": datetime.fromtimestamp(e.time, timezone.utc).isoformat(timespec="seconds"),
         "age_seconds": round(now - e.time, 1)}
        for e in reversed(recent_xids) if e.uuid == gpu.uuid
    ][:RECENT_EVENTS_SHOWN]
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "gpm_supported": gpu.gpm_supported,
        "utilization_ratio": gpu.utilization_ratio,
        "sm_active_ratio": gpu.sm_active_ratio,
        "dram_bandwidth_ratio": gpu.dram_bandwidth_ratio,
        "memory_used_bytes": gpu.memory_used_bytes,
        "memory_total_bytes": gpu.memory_total_bytes,
        "verdict": verdict,
        "reason": reason,
        "processes": processes,
        "recent_xids": xids,
    }


def _engine_entry(e: EngineState) -> dict[str, Any]:
    if not e.up:
        verdict, reason = DOWN, f"metrics endpoint: {e.error}"
    else:
        problems = []
        if e.mps_attached is False:
            problems.append("runs on the GPU without MPS")
        if e.pipe_dir_served is False:
            problems.append(f"its CUDA_MPS_PIPE_DIRECTORY {e.mps_pipe_dir} is served by no running control daemon")
        if e.cpu_bound:
            problems.append(f"CPU-bound: busiest thread at {_percent(e.busiest_thread_cpu_ratio)} of a core")
        attached = {True: "MPS attached", False: "not under MPS", None: "MPS attachment unknown"}[e.mps_attached]
        tps = "?" if e.tokens_per_second is None else f"{e.tokens_per_second:.0f}"
        figures = (f"share {_percent(e.load_share_ratio)}, {tps} tok/s, running {_count(e.requests_running)}, "
                   f"waiting {_count(e.requests_waiting)}, {attached}, busiest thread {_percent(e.busiest_thread_cpu_ratio)}")
        verdict = DEGRADED if problems else OK
        reason = "; ".join([*problems, figures])
    return {
        "name": e.name,
        "url": e.url,
        "found_by": e.found_by,
        "model": e.model,
        "gpu_uuid": e.gpu_uuid,
        "pids": list(e.pids),
        "up": e.up,
        "mps_attached": e.mps_attached,
        "load_share_ratio": e.load_share_ratio,
        "tokens_per_second": e.tokens_per_second,
        "requests_running": e.requests_running,
        "requests_waiting": e.requests_waiting,
        "busiest_thread_cpu_ratio": e.busiest_thread_cpu_ratio,
        "cpu_bound": e.cpu_bound,
        "pipe_dir": e.mps_pipe_dir,
        "pipe_dir_served": e.pipe_dir_served,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "verdict": verdict,
        "reason": reason,
    }


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _engine_gpus(data: EnginesData, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(entry["gpu_uuid"], []).append(entry)
    out = []
    for gpu_uuid, engines in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):  # unknown last
        shares = [e["gpu_memory_utilization"] for e in engines if e["gpu_memory_utilization"] is not None]
        memory_sum = sum(shares) if shares and gpu_uuid is not None else None  # unknown GPUs: nothing to add up
        imbalance = data.imbalance.get(gpu_uuid) if gpu_uuid else None
        if memory_sum is not None and memory_sum > 1.0:
            verdict, reason = DEGRADED, f"the engines' gpu_memory_utilization add up to {memory_sum:.2f} > 1"
        else:
            verdict = OK
            reason = f"{len(engines)} engine(s), imbalance {'?' if imbalance is None else f'{imbalance:.2f}'}"
        out.append({"gpu_uuid": gpu_uuid, "imbalance_ratio": imbalance, "memory_utilization_sum": memory_sum,
                    "verdict": verdict, "reason": reason, "engines": [e["name"] for e in engines]})
    return out


def _summary(control: object, daemons: list[dict[str, Any]], collectors: list[dict[str, Any]]) -> str:
    if not isinstance(control, MpsControlData):
        failed = next((c for c in collectors if c["name"] == "mps_control"), None)
        why = failed["reason"] if failed else "it has not run"
        return f"MPS control collector gave no data: {why}"
    if not daemons:
        return f"no MPS control daemon found; looked in {', '.join(control.searched)}"
    servers = sum(len(d["servers"]) for d in daemons)
    clients = sum(len(s["clients"]) for d in daemons for s in d["servers"])
    up = sum(1 for d in daemons if d["state"] == "up")
    return f"{len(daemons)} control daemon(s), {up} answering; {servers} server(s); {clients} client(s)"


def health_report(snapshot: NodeSnapshot, version: str, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
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
    logs = snapshot.data("mps_logs")
    logs = logs if isinstance(logs, MpsLogsData) else None
    daemons = [_daemon_entry(d, logs, now) for d in control.daemons] if isinstance(control, MpsControlData) else []
    verdicts = [c["verdict"] for c in collectors]
    for d in daemons:
        verdicts.append(d["verdict"])
        for s in d["servers"]:
            verdicts += [s["verdict"], *(c["verdict"] for c in s["clients"])]
    if not daemons:
        verdicts.append(DOWN)
    notes = list(control.discovery_notes) if isinstance(control, MpsControlData) else []
    if logs is not None:
        notes += logs.discovery_notes
    events = [_event_entry(log_dir, e, now) for log_dir, e in reversed(logs.recent)] if logs else []
    gpu_data = snapshot.data("gpu")
    gpus = (
        [_gpu_entry(g, now, gpu_data.recent_xids) for g in gpu_data.gpus] if isinstance(gpu_data, GpuData) else []
    )
    verdicts += [g["verdict"] for g in gpus]
    if isinstance(gpu_data, GpuData):
        notes += gpu_data.notes
    engines_data = snapshot.data("engines")
    engines = [_engine_entry(e) for e in engines_data.engines] if isinstance(engines_data, EnginesData) else []
    engine_gpus = _engine_gpus(engines_data, engines) if isinstance(engines_data, EnginesData) else []
    verdicts += [e["verdict"] for e in engines] + [g["verdict"] for g in engine_gpus]
    memory_by_pid = {p["pid"]: p["memory_bytes"] for g in gpus for p in g["processes"]}
    for d in daemons:
        for s in d["servers"]:
            for c in s["clients"]:
                c["gpu_memory_bytes"] = memory_by_pid.get(c["pid"])
    return {
        "schema": SCHEMA,
        "version": version,
        "generated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "verdict": worst(verdicts),
        "summary": _summary(control, daemons, collectors),
        "collectors": collectors,
        "daemons": daemons,
        "gpus": gpus,
        "engines": engines,
        "engine_gpus": engine_gpus,
        "log_dirs": [
            {"log_dir": d.log_dir, "found_by": d.found_by, "files": [f"{s}.log" for s in d.sources_present]}
            for d in (logs.dirs if logs else ())
        ],
        "recent_events": events[:RECENT_EVENTS_SHOWN],
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
    for g in report["gpus"]:
        lines.append(f"{g['verdict']:<9} gpu {g['index']} {g['name'] or ''} ({g['uuid']}): {g['reason']}")
        for x in g["recent_xids"]:
            lines.append(f"{'XID':<9} {_age(x['age_seconds']) + ' ago':>9} gpu {g['index']}: XID {x['xid']}, {x['meaning']}")
    by_name = {e["name"]: e for e in report["engines"]}
    for group in report["engine_gpus"]:
        lines.append(f"{group['verdict']:<9} engines on {group['gpu_uuid'] or 'an unknown GPU'}: {group['reason']}")
        for name in group["engines"]:
            e = by_name[name]
            lines.append(f"{e['verdict']:<9}   engine {name}: {e['reason']}")
    for e in report["recent_events"]:
        lines.append(f"{'EVENT':<9} {_age(e['age_seconds']) + ' ago':>9} {e['event']}: {_who(e)} ({e['log_dir']})")
    for note in report["notes"]:
        lines.append(f"{'NOTE':<9} {note}")
    return "\n".join(lines) + "\n"


def advice_report(snapshot: NodeSnapshot) -> dict[str, Any]:
    """`mpswatch advise --json`: one entry per GPU with engines."""
    gpus, engines = snapshot.data("gpu"), snapshot.data("engines")
    notes = []
    if not isinstance(gpus, GpuData):
        notes.append("no GPU data (NVML unavailable?): the advice needs each engine's GPU")
    if not isinstance(engines, EnginesData) or not engines.engines:
        notes.append("no engines found: nothing to advise on")
    advice = (advise_node(gpus.gpus, engines.engines, dict(engines.imbalance))
              if isinstance(gpus, GpuData) and isinstance(engines, EnginesData) else [])
    if isinstance(engines, EnginesData) and any(e.gpu_uuid is None for e in engines.engines):
        notes.append("engines on an unknown GPU are left out (their GPU process is not seen)")
    return {
        "schema": "mpswatch.advise/v1",
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpus": [{"gpu_uuid": a.gpu_uuid, "engines": a.engines, "verdict": a.verdict,
                  "gain_estimate": None if a.gain_estimate is None else round(a.gain_estimate, 4),
                  "reasons": list(a.reasons), "recommendations": list(a.recommendations)} for a in advice],
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
