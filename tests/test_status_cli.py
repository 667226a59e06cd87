"""`mpswatch status`: verdicts, exit codes, and the documented JSON schema."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.kit.agentproc import agent_env, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL

DOCS = Path(__file__).resolve().parent.parent / "docs" / "status.md"


def status(*args, env=None):
    run = subprocess.run(
        mpswatch_cmd("status", "--mps-control-bin", FAKE_CONTROL, *args, nvml="h200_all_mps"),  # a healthy GPU
        env=agent_env(env), capture_output=True, text=True, timeout=60,
    )
    return run.returncode, run.stdout, run.stderr


def test_all_ok_exits_0_with_one_line_per_daemon_and_server_and_one_for_its_clients(fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    code, out, _ = status("--pipe-dir", daemon.path)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("OK ") and "1 control daemon(s), 1 answering; 1 server(s); 2 client(s)" in lines[0]
    assert re.match(rf"OK +daemon {re.escape(daemon.path)} \(pid {daemon.process.pid}\): answering", lines[1])
    assert re.match(r"OK +server 476( uid \d+)?: ACTIVE; clients 2/48 on GPU-2ea0ea17-0206-eb44", lines[2].strip())
    assert lines[3] == "OK            2 clients connected"
    assert lines[4].startswith("OK        gpu 0 NVIDIA H200 (GPU-b0364874-2b6d-037a-0496-f04da35f2f2d): utilisation 99%")


def test_a_server_in_fault_is_down_and_its_clients_degraded(fake_daemon):
    daemon = fake_daemon("server_fault_driver580")
    code, out, _ = status("--pipe-dir", daemon.path)
    assert code == 1
    assert out.splitlines()[0].startswith("DOWN ")
    assert any(l.startswith("DOWN") and "server 632" in l and "FAULT" in l for l in out.splitlines())
    assert sum(1 for l in out.splitlines() if l.startswith("DEGRADED") and "client" in l) == 2


def test_a_full_device_is_degraded(fake_daemon):
    code, out, _ = status("--pipe-dir", fake_daemon("clients_48_driver580").path)
    assert code == 1 and "48/48 clients on GPU-2ea0ea17-0206-eb44: the next client will be refused" in out


def test_a_hung_daemon_is_down_and_status_still_returns(fake_daemon):
    daemon = fake_daemon("hung_daemon")
    code, out, _ = status("--pipe-dir", daemon.path, "--command-timeout", "0.5")
    assert code == 1 and "DOWN" in out and "no answer within 0.5 s" in out


def nowhere(tmp_path):
    """A config under which discovery finds nothing: its dirs and /proc are empty dirs of the test's."""
    (tmp_path / "proc").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'proc_root = "{tmp_path}/proc"\ndevice_plugin_root = "{tmp_path}/k8s"\n'
                      f'[mps_control]\ndefault_pipe_dirs = ["{tmp_path}/a"]\n[mps_logs]\ndefault_log_dir = "{tmp_path}/log"\n')
    return str(config)


@pytest.mark.parametrize(("expected", "code", "first"), [
    ("true", 1, "DOWN      mpswatch 0.1.0: MPS: no control daemon found, but MPS is expected (mps_control.expected = true); looked in "),
    ("auto", 1, "DEGRADED  mpswatch 0.1.0: MPS: no control daemon found, and none expected (no engine sets CUDA_MPS_PIPE_DIRECTORY; "),
    ("false", 0, "OK        mpswatch 0.1.0: no MPS control daemon found; looked in "),
])
def test_nothing_found_says_where_it_looked_in_one_line_and_whether_mps_is_expected(tmp_path, expected, code, first):
    returned, out, _ = status("--config", nowhere(tmp_path), "--mps-expected", expected)
    assert returned == code
    assert out.splitlines()[0].startswith(first) and f"looked in {tmp_path}/a, " in out.splitlines()[0]


def test_a_48_client_node_with_a_fault_lists_the_problems_first_and_counts_the_healthy_clients(fake_daemon):
    full, fault = fake_daemon("clients_48_driver580"), fake_daemon("server_fault_driver580")
    code, out, _ = status("--pipe-dir", full.path, "--pipe-dir", fault.path)
    lines = out.splitlines()
    assert code == 1
    assert lines[0].startswith(f"DOWN      mpswatch 0.1.0: server 632 on {fault.path}: FAULT: ")
    assert lines[0].endswith("; 3 more problems")
    assert lines[1].startswith(f"DOWN      server 632 on {fault.path}: FAULT")
    assert lines[2] == (f"DEGRADED  server 476 on {full.path}: 48/48 clients on GPU-2ea0ea17-0206-eb44: "
                        "the next client will be refused")
    assert [l.split()[:3] for l in lines[3:5]] == [["DEGRADED", "client", "629"], ["DEGRADED", "client", "513"]]
    assert "OK          48 clients of server 476 connected" in lines
    assert not any(re.match(r"OK +client ", l) for l in lines)  # 48 healthy clients, one line
    verdicts = [l.split()[0] for l in lines]
    assert verdicts[:5] == ["DOWN", "DOWN", "DEGRADED", "DEGRADED", "DEGRADED"] and "DOWN" not in verdicts[5:]


def _keys(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item, f"{prefix}[].")


def test_json_follows_the_documented_schema(fake_daemon, tmp_path):
    daemon = fake_daemon("server_fault_driver580")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "server.log").write_text(
        "[2026-11-29 18:41:46.635 Server   632] Client {PID: 513, Context: 1} encountered a fatal GPU error.\n"
    )
    code, out, _ = status("--json", "--pipe-dir", daemon.path, "--log-dir", str(log_dir))
    report = json.loads(out)
    assert code == 1 and report["schema"] == "mpswatch.status/v1" and report["verdict"] == "DOWN"
    [d] = report["daemons"]
    assert d["state"] == "up" and d["verdict"] == "OK"
    [server] = d["servers"]
    assert server["status"] == "FAULT" and server["verdict"] == "DOWN"
    assert server["fault_cause"]["event"] == "fatal_gpu_error"
    assert {c["verdict"] for c in server["clients"]} == {"DEGRADED"}
    documented = set(re.findall(r"^\| `([a-z_.\[\]<>]+)` \|", DOCS.read_text(), re.MULTILINE))
    placeholders = {
        "daemons.[].servers.[].clients_per_device.": "daemons.[].servers.[].clients_per_device.<device>",
        "daemons.[].servers.[].fault_cause.": "daemons.[].servers.[].fault_cause.<field>",
    }
    produced = set()
    for k in _keys(report):
        prefix = next((p for p in placeholders if k.startswith(p)), None)
        produced.add(placeholders[prefix] if prefix else k)
    assert produced <= documented, produced - documented
    # what this report does not show sits only under lists that are empty here (no XIDs in this run)
    empty = {k for k, v in _items(report) if v == []}
    assert all(any(k.startswith(e + ".[].") for e in empty) for k in documented - produced), documented - produced


def _items(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}", v
            yield from _items(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for item in value:
            yield from _items(item, f"{prefix}[].")
