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
    assert lines[0].endswith("; 4 more problems")
    assert lines[1].startswith(f"DOWN      server 632 on {fault.path}: FAULT")
    assert lines[2] == (f"DOWN      blast radius of server 632 on {fault.path}: the MPS log names no client; "
                        "2 clients shared the server: 629 still attached, 513 still attached")
    assert lines[3] == (f"DEGRADED  server 476 on {full.path}: 48/48 clients on GPU-2ea0ea17-0206-eb44: "
                        "the next client will be refused")
    assert [l.split()[:3] for l in lines[4:6]] == [["DEGRADED", "client", "629"], ["DEGRADED", "client", "513"]]
    assert "OK          48 clients of server 476 connected" in lines
    assert not any(re.match(r"OK +client ", l) for l in lines)  # 48 healthy clients, one line
    verdicts = [l.split()[0] for l in lines]
    assert verdicts[:6] == ["DOWN", "DOWN", "DOWN", "DEGRADED", "DEGRADED", "DEGRADED"] and "DOWN" not in verdicts[6:]


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
        "blast_radius.[].fatal_error.": "blast_radius.[].fatal_error.<field>",
    }
    produced = set()
    for k in _keys(report):
        prefix = next((p for p in placeholders if k.startswith(p)), None)
        produced.add(placeholders[prefix] if prefix else k)
    assert produced <= documented, produced - documented
    # what this report does not show sits only under lists that are empty here (no XIDs in this run) and
    # objects that are null (no client came back on another server)
    empty = {k + ".[]." for k, v in _items(report) if v == []} | {k + "." for k, v in _items(report) if v is None}
    assert all(any(k.startswith(e) for e in empty) for k in documented - produced), documented - produced


def _items(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{prefix}{k}", v
            yield from _items(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for item in value:
            yield from _items(item, f"{prefix}[].")


LOGS = Path(__file__).resolve().parent / "fixtures" / "h200-driver580"


def pod_process(proc: Path, pid: int, namespace: str, pod: str, pod_uid: str, container_id: str) -> None:
    """A process in a kubelet-style cgroup (the systemd driver's) whose environment names its pod, in a
    /proc of the test's."""
    root = proc / str(pid)
    (root / "root/var/run/secrets/kubernetes.io/serviceaccount").mkdir(parents=True)
    (root / "root/var/run/secrets/kubernetes.io/serviceaccount/namespace").write_text(namespace)
    (root / "cgroup").write_text(f"0::/kubepods.slice/kubepods-pod{pod_uid.replace('-', '_')}.slice/"
                                 f"cri-containerd-{container_id}.scope\n")
    (root / "environ").write_bytes(f"HOSTNAME={pod}\0PATH=/usr/bin\0".encode())


def test_a_fault_lists_the_client_mps_blames_with_its_pod_and_every_client_that_shared_its_server(fake_daemon, tmp_path):
    """Server 632 in FAULT with clients 629 and 513, its server.log (the H200's session 2, its server PID
    632) blaming 513; server 476 of another daemon healthy, its client 438 a new process of 629's pod."""
    from tests.kit.fakepodresources import FakePodResources

    healthy, fault = fake_daemon("healthy_two_clients_driver580"), fake_daemon("server_fault_driver580")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "server.log").write_text((LOGS / "session2-fault-server.log").read_text().replace("   440] ", "   632] "))
    proc = tmp_path / "proc"
    team_a, team_b = "0000000a-5b7d-4c2e-9f00-1a2b3c4d5e6f", "0000000b-5b7d-4c2e-9f00-1a2b3c4d5e6f"
    pod_process(proc, 513, "team-b", "vllm-b", team_b, "bb" * 32)
    pod_process(proc, 629, "team-a", "vllm-a", team_a, "aa" * 32)
    pod_process(proc, 438, "team-a", "vllm-a", team_a, "cc" * 32)  # the pod's container, restarted
    config = tmp_path / "c.toml"
    config.write_text(f'proc_root = "{proc}"\ndevice_plugin_root = "{tmp_path}/k8s"\n'
                      f'[mps_control]\npipe_dirs = ["{healthy.path}", "{fault.path}"]\n'
                      f'[mps_logs]\nlog_dirs = ["{log_dir}"]\ntimezone = "UTC"\n'
                      f'[pods]\npod_resources_socket = "{tmp_path}/kubelet.sock"\n')
    with FakePodResources(tmp_path / "kubelet.sock", {"team-a/vllm-a": {"vllm": []}, "team-b/vllm-b": {"vllm": []}}):
        code, out, _ = status("--config", str(config), "--json")
        _, text, _ = status("--config", str(config))
    assert code == 1
    report = json.loads(out)
    [blast] = report["blast_radius"]
    assert (blast["pipe_dir"], blast["server_pid"], blast["state"], blast["verdict"]) == (fault.path, 632, "fault", "DOWN")
    assert blast["blamed"] == {"pid": 513, "engine": None, "pod": "team-b/vllm-b"}
    assert blast["fatal_error"]["client_pid"] == 513 and blast["fatal_error"]["log_dir"] == str(log_dir)
    assert [(c["pid"], c["pod"], c["blamed"], c["attached"]) for c in blast["clients"]] == [
        (513, "team-b/vllm-b", True, True), (629, "team-a/vllm-a", False, True)]
    assert blast["clients"][0]["back_on"] is None
    assert blast["clients"][1]["back_on"] == {"pipe_dir": healthy.path, "server_pid": 476, "pid": 438, "engine": None,
                                              "pod": "team-a/vllm-a", "by": "pod"}
    lines = text.splitlines()
    assert re.match(rf"DOWN      server 632 on {re.escape(fault.path)}: FAULT: MPS blames client 513 \(pod team-b/vllm-b\) "
                    r"for a fatal GPU error \d+[smhd] ago; ", lines[1])
    assert re.fullmatch(rf"DOWN      blast radius of server 632 on {re.escape(fault.path)}: MPS blames client 513 "
                        r"\(pod team-b/vllm-b\) for a fatal GPU error \d+[smhd] ago \(MPS can blame an innocent client\); "
                        r"2 clients shared the server: 513 \(pod team-b/vllm-b\) still attached, 629 \(pod team-a/vllm-a\) "
                        r"still attached, back on server 476 as 438 \(pod team-a/vllm-a\)", lines[2])
