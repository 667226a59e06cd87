"""The rest of the fault matrix on a real GPU: a killed daemon and its orphaned server, a killed
server, a client exhausting GPU memory, logs rotated and truncated under the agent, the agent
restarted mid-run, and the agent as an unprivileged user. The hang, the 50 clients, the fatal
error and the engine without MPS are rows of the other GPU test modules.

Each case is a row of tests.gpu.results.MATRIX (with a recording of the agent's series, which
tests/test_matrix_alerts.py hands to promtool with the shipped rules)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import structlog

from tests.gpu.results import MATRIX
from tests.kit.agentproc import REPO, Agent, agent_env, free_port, gpu_uuid, key, mpswatch_cmd, parse_exposition
from tests.kit.realmps import MpsDaemon, read_line, rest_of_output

NOBODY = 65534
FAST_LOGS = {"MPSWATCH_MPS_LOGS_INTERVAL_SECONDS": "0.5"}


def start(binary, mps, *args) -> subprocess.Popen:
    return subprocess.Popen([binary, *args], env=mps.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ready(client: subprocess.Popen) -> subprocess.Popen:
    line = read_line(client)
    assert line.startswith("ready"), line or "no line within 30 s"
    return client


def of(samples, name) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def events(samples, log_dir: str, event: str) -> float:
    return sum(v for (n, l), v in samples.items()
               if n == "mps_log_events_total" and dict(l).get("log_dir") == log_dir and dict(l)["event"] == event)


def status(pipe: str, logs: str) -> tuple[int, dict]:
    run = subprocess.run(mpswatch_cmd("status", "--json", "--pipe-dir", pipe, "--log-dir", logs),
                         env=agent_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode, json.loads(run.stdout)


def timed(agent: Agent, predicate, timeout: float, since: float):
    """(value, seconds since `since`) once predicate(samples) is truthy."""
    value = agent.wait_for(predicate, timeout=timeout, interval=0.05)
    return value, round(time.monotonic() - since, 3)


def test_killed_daemon_then_restarted(mps, mps_client, tmp_path):
    """Whether the server outlives its killed daemon depends on the driver (on an H200 with driver 580
    it did not): the agent must report what is there, checked against /proc."""
    case = MATRIX.case("control daemon killed, then restarted",
                       "SIGKILL to the control daemon while two clients run kernels; later `nvidia-cuda-mps-control -d` again")
    daemon_pid = mps.start()
    clients = [ready(start(mps_client, mps, "hold", "30")) for _ in range(2)]
    pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
    with Agent(["--pipe-dir", pipe, "--log-dir", logs], env=FAST_LOGS, log_path=tmp_path / "agent.log") as agent:
        case.record(agent)
        s = agent.wait_for(lambda s: s if sum(of(s, "mps_clients").values()) == 2 else None, timeout=15)
        [server_pid] = [int(dict(l)["server_pid"]) for l in of(s, "mps_server_info")]
        case.reported["GPU processes before"] = gpu0_processes(s)
        case.expect_quiet("MPSControlDaemonDown")

        killed_at = time.monotonic()
        os.kill(daemon_pid, signal.SIGKILL)
        stale = key("mps_control_state", pipe_dir=pipe, state="stale_pid_file")
        _, case.detect_seconds["mps_control_state stale_pid_file"] = timed(agent, lambda s: s.get(stale) == 1, 10, killed_at)
        case.expect_alert("MPSControlDaemonDown")
        time.sleep(3)  # let whatever follows the daemon's death happen
        servers_alive = [server_pid] if _running(server_pid) else []
        orphans = key("mps_orphaned_servers", pipe_dir=pipe)
        s, _ = timed(agent, lambda s: s if s.get(orphans) == len(servers_alive) else None, 6, killed_at)
        case.reported["server alive after the daemon's death (/proc)"] = bool(servers_alive)
        case.reported["mps_orphaned_servers"] = s.get(orphans)
        case.reported["clients alive after the daemon's death"] = [c.poll() is None for c in clients]
        case.reported["GPU processes after"] = gpu0_processes(s)
        code, report = status(pipe, logs)
        [daemon] = report["daemons"]
        case.status_verdict = report["verdict"]
        case.reported["status daemon reason"] = daemon["reason"]
        assert code == 1 and daemon["state"] == "stale_pid_file"
        assert daemon["orphaned_server_pids"] == servers_alive

        restarted_at = time.monotonic()
        mps.start()
        up = key("mps_control_up", pipe_dir=pipe)
        s, case.detect_seconds["restart: mps_control_up 1"] = timed(agent, lambda s: s if s.get(up) == 1 else None, 10, restarted_at)
        assert orphans not in s  # counted only while the daemon is gone
        newcomer = start(mps_client, mps, "hold", "4")
        case.reported["new client after restart"] = read_line(newcomer)
        if case.reported["new client after restart"].startswith("ready"):
            s, case.detect_seconds["restart: new client listed"] = timed(
                agent, lambda s: s if sum(of(s, "mps_clients").values()) >= 1 else None, 10, restarted_at)
            case.reported["GPU processes with the new client"] = gpu0_processes(s)
        for client in [*clients, newcomer]:  # they exit on their own: killing a client can take the server down
            case.reported.setdefault("client exits", []).append(rest_of_output(client)[-200:])
        code, report = status(pipe, logs)
        case.reported["status after restart"] = report["daemons"][0]["reason"]
        assert report["daemons"][0]["state"] == "up"
        case.finish_recording()
    case.notes.append((mps.log_dir / "control.log").read_text()[-3000:])
    case.passed = True


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def gpu0_processes(samples) -> dict[str, float]:
    """GPU 0's memory by process kind (mps_client, mps_server, exclusive): series name no PIDs."""
    gpu0 = gpu_uuid(samples, 0)
    return {dict(l)["kind"]: v for l, v in of(samples, "mps_gpu_memory_by_kind_bytes").items() if dict(l)["gpu_uuid"] == gpu0}


def test_server_killed_while_clients_run(mps, mps_client, tmp_path):
    case = MATRIX.case("MPS server killed while clients run", "SIGKILL to the MPS server while two clients run kernels; then a new client")
    mps.start()
    clients = [ready(start(mps_client, mps, "hold", "20")) for _ in range(2)]
    pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
    try:
        with Agent(["--pipe-dir", pipe, "--log-dir", logs], env=FAST_LOGS, log_path=tmp_path / "agent.log") as agent:
            case.record(agent)
            s = agent.wait_for(lambda s: s if sum(of(s, "mps_clients").values()) == 2 else None, timeout=15)
            [server_pid] = [dict(l)["server_pid"] for l in of(s, "mps_server_info")]
            case.expect_quiet("MPSServerDied")
            killed_at = time.monotonic()
            os.kill(int(server_pid), signal.SIGKILL)
            _, case.detect_seconds["server gone from mps_server_info"] = timed(
                agent, lambda s: all(dict(l)["server_pid"] != server_pid for l in of(s, "mps_server_info")), 10, killed_at)
            _, case.detect_seconds["mps_servers_lost_total +1"] = timed(
                agent, lambda s: s.get(key("mps_servers_lost_total", pipe_dir=pipe)) == 1, 10, killed_at)
            case.expect_alert("MPSServerDied")
            case.reported["client outcomes"] = [rest_of_output(c, 30) for c in clients]
            code, report = status(pipe, logs)
            case.status_verdict = report["verdict"]
            case.reported["status recent events"] = [
                f"{e['event']} {e.get('detail') or ''}".strip() for e in report["recent_events"]][:5]
            case.reported["server_died events in the log"] = events(agent.scrape(), logs, "server_died")

            again_at = time.monotonic()
            newcomer = start(mps_client, mps, "hold", "3")
            case.reported["new client"] = read_line(newcomer)
            # the new server (a new PID on mps_server_info) ACTIVE: its status series is its user's, as the old one's was
            active = lambda s: [dict(l)["server_pid"] for l in of(s, "mps_server_info")  # noqa: E731
                                if dict(l)["server_pid"] != server_pid
                                and s.get(key("mps_server_status", pipe_dir=pipe, uid=dict(l)["uid"], status="ACTIVE")) == 1]
            _, case.detect_seconds["new server ACTIVE"] = timed(agent, active, 15, again_at)
            rest_of_output(newcomer, 30)
            case.finish_recording()
    finally:
        case.notes.append((mps.log_dir / "control.log").read_text()[-3000:])
        case.notes.append(((mps.log_dir / "server.log").read_text() if (mps.log_dir / "server.log").exists() else "")[-2000:])
    case.passed = True


def test_a_client_exhausting_gpu_memory_beside_another(mps, mps_client, tmp_path):
    case = MATRIX.case("a client exhausting GPU memory beside another client",
                       "one client runs kernels; another cudaMallocs until the GPU is full and holds it 12 s")
    mps.start()
    innocent = ready(start(mps_client, mps, "hold", "25"))
    pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
    with Agent(["--pipe-dir", pipe, "--log-dir", logs], log_path=tmp_path / "agent.log") as agent:
        case.record(agent)
        agent.wait_for(lambda s: of(s, "mps_gpu_memory_used_bytes") and sum(of(s, "mps_clients").values()) == 1, timeout=15)
        case.expect_quiet("MPSGPUMemoryNearlyFull")
        hog_at = time.monotonic()
        hog = ready(start(mps_client, mps, "hog", "12"))
        hogged = int(read_line(hog, 120).split()[1])
        case.reported["hogged bytes"] = hogged

        def full(s):
            used, total = of(s, "mps_gpu_memory_used_bytes"), of(s, "mps_gpu_memory_total_bytes")
            return [used[l] / total[l] for l in used if l in total and used[l] / total[l] > 0.95]

        ratio, case.detect_seconds["memory used > 95%"] = timed(agent, full, 15, hog_at)
        case.reported["memory used ratio"] = round(ratio[0], 4)
        case.expect_alert("MPSGPUMemoryNearlyFull")
        s = agent.scrape()
        by_kind = gpu0_processes(s)
        case.reported["GPU 0 memory by kind"] = by_kind
        assert by_kind.get("mps_client", 0) >= 0.9 * hogged  # the hog counted as an MPS client
        assert all(dict(l)["status"] != "FAULT" or v == 0 for l, v in of(s, "mps_server_status").items())
        code, report = status(pipe, logs)
        case.status_verdict = report["verdict"]
        case.reported["status gpu line"] = [g["reason"] for g in report.get("gpus", [])]
        case.reported["hog exit"] = rest_of_output(hog)
        case.reported["innocent client"] = rest_of_output(innocent)
        assert innocent.returncode == 0 and case.reported["innocent client"] == "done"
        case.finish_recording()
    case.passed = True


def _connect(mps, mps_client, n: int) -> None:
    clients = [start(mps_client, mps, "idle", "0.2") for _ in range(n)]
    for client in clients:
        assert read_line(client).startswith("ready")
        rest_of_output(client, 30)
        assert client.returncode == 0


def test_logs_rotated_and_truncated_while_the_agent_runs(mps, mps_client, tmp_path):
    case = MATRIX.case("MPS logs rotated and truncated while the agent runs",
                       "3 clients; copytruncate of both logs; 3 clients; rename rotation of both logs; 3 clients")
    mps.start()
    pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
    server_log, control_log = mps.log_dir / "server.log", mps.log_dir / "control.log"
    connected = lambda n: lambda s: events(s, logs, "client_connected") == n  # noqa: E731
    with Agent(["--pipe-dir", pipe, "--log-dir", logs], env=FAST_LOGS, log_path=tmp_path / "agent.log") as agent:
        case.record(agent)
        _connect(mps, mps_client, 3)
        agent.wait_for(connected(3), timeout=10)
        for log in (server_log, control_log):  # logrotate's copytruncate
            shutil.copyfile(log, f"{log}.1")
            os.truncate(log, 0)
        t0 = time.monotonic()
        _connect(mps, mps_client, 3)
        _, case.detect_seconds["3 connects after copytruncate counted"] = timed(agent, connected(6), 10, t0)
        for log in (server_log, control_log):  # logrotate's default: rename, MPS goes on writing
            os.rename(log, f"{log}.2")
        t0 = time.monotonic()
        _connect(mps, mps_client, 3)
        _, case.detect_seconds["3 connects after rename counted"] = timed(agent, connected(9), 10, t0)
        time.sleep(2)
        s = agent.scrape()
        case.reported["client_connected counted"] = events(s, logs, "client_connected")
        case.reported["file resets"] = {f"{dict(l)['source']}/{dict(l)['reason']}": v for l, v in of(s, "mps_log_file_resets_total").items() if v}
        case.reported["read errors"] = {f"{dict(l)['source']}/{dict(l)['reason']}": v for l, v in of(s, "mps_log_read_errors_total").items() if v}
        case.reported["files"] = sorted(p.name for p in mps.log_dir.iterdir())
        lines = sum(len(re.findall(r"Client \{PID: \d+, Context(?: ID)?: 0\} connected", p.read_text(errors="replace")))
                    for p in mps.log_dir.glob("server.log*"))
        case.reported["connect lines in all server.log files"] = lines
        assert events(s, logs, "client_connected") == 9
        case.expect_quiet("MPSClientsRefused")
        case.expect_quiet("MPSFatalGPUError")
        case.finish_recording()
    case.passed = True


def test_agent_restarted_mid_run(mps, mps_client, tmp_path):
    case = MATRIX.case("the agent restarted mid-run",
                       "agent stopped (SIGTERM) while two clients run; two more connect while it is down; agent started again")
    mps.start()
    pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
    clients = [ready(start(mps_client, mps, "hold", "30")) for _ in range(2)]
    args = ["--pipe-dir", pipe, "--log-dir", logs]
    with Agent(args, env=FAST_LOGS, log_path=tmp_path / "agent1.log") as first:
        first.wait_for(lambda s: sum(of(s, "mps_clients").values()) == 2, timeout=10)
    clients += [ready(start(mps_client, mps, "hold", "20")) for _ in range(2)]  # while no agent runs
    started = time.monotonic()
    with Agent(args, env=FAST_LOGS, log_path=tmp_path / "agent2.log") as second:
        case.detect_seconds["restart: /healthz"] = round(time.monotonic() - started, 3)
        case.record(second)
        s, case.detect_seconds["restart: 4 clients on /metrics"] = timed(
            second, lambda s: s if sum(of(s, "mps_clients").values()) == 4 else None, 15, started)
        case.reported["client_connected counted after restart (backfill is not counted)"] = events(s, logs, "client_connected")
        last = of(s, "mps_log_last_event_timestamp_seconds")
        case.reported["last client_connected time known"] = any(dict(l)["event"] == "client_connected" for l in last)
        assert events(s, logs, "client_connected") == 0 and case.reported["last client_connected time known"]
        _connect(mps, mps_client, 1)
        second.wait_for(lambda s: events(s, logs, "client_connected") == 1, timeout=10)
        code, report = status(pipe, logs)
        case.status_verdict = report["verdict"]
        case.expect_quiet("MPSClientsRefused")
        case.expect_quiet("MPSFatalGPUError")
        case.expect_quiet("MPSControlDaemonDown")
        case.finish_recording()
    for client in clients:
        rest_of_output(client)
    case.passed = True


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the agent as another user: needs root")
def test_the_agent_as_an_unprivileged_user(mps_client, tmp_path):
    """Root's daemon, the agent as `nobody`: records what works and what needs which permission."""
    case = MATRIX.case("the agent as an unprivileged user (nobody)",
                       "root's MPS daemon and a client; `mpswatch status` and `mpswatch run` as uid 65534")
    root = Path(tempfile.mkdtemp(prefix="mpswatch-unpriv-", dir="/tmp"))
    code_dir = root / "code"  # the agent and structlog where uid 65534 can read them
    shutil.copytree(REPO / "agent" / "mpswatch", code_dir / "mpswatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(structlog.__file__).parent, code_dir / "structlog", ignore=shutil.ignore_patterns("__pycache__"))
    mps = MpsDaemon(root / "mps")
    for d in (root, *root.rglob("*")):
        d.chmod(0o755 if d.is_dir() else 0o644)
    agent = None
    agent_log = open(tmp_path / "agent-as-nobody.log", "wb")
    as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    try:
        mps.start()
        client = ready(start(mps_client, mps, "hold", "20"))
        pipe, logs = str(mps.pipe_dir), str(mps.log_dir)
        case.reported["pipe dir"] = subprocess.run(["ls", "-la", pipe], capture_output=True, text=True).stdout
        case.reported["log dir"] = subprocess.run(["ls", "-la", logs], capture_output=True, text=True).stdout
        env = {k: v for k, v in agent_env().items() if k != "PYTHONPATH"}
        env.update(HOME="/tmp", PYTHONPATH=str(code_dir))
        try:
            query = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True,
                                   text=True, env={**env, "CUDA_MPS_PIPE_DIRECTORY": pipe}, timeout=10, **as_nobody)
            case.reported["nvidia-cuda-mps-control as nobody"] = f"exit {query.returncode}: {(query.stdout + query.stderr).strip()[:200]}"
        except subprocess.TimeoutExpired:
            case.reported["nvidia-cuda-mps-control as nobody"] = "no answer within 10 s"
        # the agent as deployed (`python -m mpswatch`, from the copy nobody can read), not the kit's
        # launcher: its filter reads processes' environments, which nobody may not read
        mpswatch = [sys.executable, "-m", "mpswatch"]
        run = subprocess.run([*mpswatch, "status", "--json", "--pipe-dir", pipe, "--log-dir", logs], env=env,
                             capture_output=True, text=True, timeout=60, **as_nobody)
        assert run.stdout.strip(), f"exit {run.returncode}: {run.stderr[-2000:]}"
        report = json.loads(run.stdout)
        case.status_verdict = report["verdict"]
        case.reported["status as nobody"] = {
            "exit": run.returncode,
            "daemons": [(d["state"], d["reason"]) for d in report["daemons"]],
            "gpus": [g["reason"] for g in report.get("gpus", [])],
            "log_dirs": report.get("log_dirs"),
            "notes": report.get("notes"),
            "collectors": [(c["name"], c["verdict"], c["reason"]) for c in report["collectors"]],
        }
        port = free_port()
        agent = subprocess.Popen([*mpswatch, "run", "--listen", f"127.0.0.1:{port}", "--pipe-dir", pipe, "--log-dir", logs],
                                 env=env, stdout=agent_log, stderr=subprocess.STDOUT, **as_nobody)
        samples = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    samples = parse_exposition(r.read().decode())
            except OSError:
                continue
            if len(of(samples, "mps_exporter_collector_success")) >= 4 and time.monotonic() > deadline - 12:
                break  # every collector has run at least twice
        assert agent.poll() is None, (tmp_path / "agent-as-nobody.log").read_text()[-2000:]
        case.reported["families exported as nobody"] = sorted({n for n, _ in samples})
        case.reported["collector success as nobody"] = {dict(l)["collector"]: v for l, v in of(samples, "mps_exporter_collector_success").items()}
        case.reported["mps_control_state as nobody"] = [dict(l)["state"] for l, v in of(samples, "mps_control_state").items() if v == 1]
        case.reported["mps_clients as nobody"] = sum(of(samples, "mps_clients").values())
        case.reported["gpu process kinds as nobody"] = sorted({dict(l)["kind"] for l in of(samples, "mps_gpu_memory_by_kind_bytes")})
        # what must hold without privileges: the agent runs, serves, and says what it cannot see
        assert samples and case.reported["collector success as nobody"]
        rest_of_output(client)
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        agent_log.close()
        try:
            mps.cleanup()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    case.reported["agent log as nobody (warnings)"] = [
        line[:300] for line in (tmp_path / "agent-as-nobody.log").read_text(errors="replace").splitlines()
        if "warning" in line or "error" in line][:8]
    case.passed = True
