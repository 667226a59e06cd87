"""`mpswatch status` on a node laid out as the Kubernetes device plugin lays out its MPS daemon: pipe
and log dirs under `<root>/nvidia.com/gpu/`, found by discovery alone, the daemon named by its
resource, and a server that started before the daemon's limits were set (k8s-device-plugin PR 1946)
told from its control.log."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.kit.agentproc import agent_env, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL

PLUGIN_LOG = Path(__file__).parent / "fixtures" / "device-plugin-mps" / "limits-race-control.log"
PS = ("PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND\n"
      "2210      1         2215           GPU-2ea0ea17-0206-eb44    4026531836     python3\n"
      "2388      2         2215           GPU-2ea0ea17-0206-eb44    4026531836     python3\n")


def plugin_node(tmp_path: Path, control_log: str, server_atp: str = "100.0", default_atp: str = "50.0") -> tuple[str, str]:
    """The device plugin's dirs for nvidia.com/gpu under tmp_path/mps (its `.started` file too), its
    daemon answered by the fake control program (by default as the race leaves it: server 2215 at 100 %
    where the default is now 50 %), and a config under which nothing else on the test machine is
    found. (config path, pipe dir)"""
    resource = tmp_path / "mps" / "nvidia.com" / "gpu"
    pipe, log = resource / "pipe", resource / "log"
    pipe.mkdir(parents=True)
    log.mkdir()
    (pipe / "control").touch()
    (resource / ".started").touch()
    (pipe / "scenario.json").write_text(json.dumps({"mode": "answer", "replies": {
        "get_server_list": "2215\n", "get_server_status 2215": "ACTIVE\n",
        "get_active_thread_percentage 2215": f"{server_atp}\n", "get_default_active_thread_percentage": f"{default_atp}\n",
        "get_default_device_pinned_mem_limit 0": "71885M\n", "ps": PS}}))
    (log / "control.log").write_text(control_log)
    (tmp_path / "proc").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f"""\
proc_root = "{tmp_path}/proc"
device_plugin_root = "{tmp_path}/mps"

[mps_control]
default_pipe_dirs = ["{tmp_path}/no-default-pipe-dir"]
control_bin = "{FAKE_CONTROL}"

[mps_logs]
default_log_dir = "{tmp_path}/no-default-log-dir"

[engine_scrape]
discover = false

[pods]
pod_resources_socket = "{tmp_path}/no-kubelet.sock"
""")
    return str(config), str(pipe)


def status(config: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(mpswatch_cmd("status", *flags, "--config", config, nvml="h200_all_mps"), env=agent_env(),
                          capture_output=True, text=True, timeout=60)


def test_a_server_started_before_the_plugins_limits_is_reported_with_its_daemons_resource(tmp_path):
    config, pipe = plugin_node(tmp_path, PLUGIN_LOG.read_text())
    text = status(config)
    assert text.returncode == 1
    assert re.search(rf"^DEGRADED  server 2215 on {re.escape(pipe)}: started \S+ ago, before the daemon's limits were "
                     r"set \(set_default_active_thread_percentage 50, \S+ ago\): it runs with the defaults of before "
                     r"\(active threads 100% where the daemon's default is 50%\); so do its 2 client\(s\)$",
                     text.stdout, re.MULTILINE), text.stdout
    assert f"OK        daemon {pipe}: answering; 1 server(s), 2 client(s); device plugin resource nvidia.com/gpu" \
        in text.stdout
    report = json.loads(status(config, "--json").stdout)
    [daemon] = report["daemons"]
    assert (daemon["found_by"], daemon["resource"]) == ("device_plugin", "nvidia.com/gpu")
    [server] = daemon["servers"]
    assert (server["started_before_limits"], server["verdict"]) == (True, "DEGRADED")
    [log_dir] = report["log_dirs"]
    assert (log_dir["found_by"], log_dir["files"]) == ("device_plugin", ["control.log"])


@pytest.mark.parametrize(("when", "atp"), [("after the limits", "50.0"), ("with no limits set at all", "100.0")])
def test_a_server_started_with_the_daemons_limits_in_force_is_ok(tmp_path, when, atp):
    lines = PLUGIN_LOG.read_text().splitlines(keepends=True)
    start = lines.pop(7)
    assert "Starting new server 2215" in start
    if when == "after the limits":  # the plugin set its limits before the first client came
        lines.insert(16, start.replace("09:14:05.109", "09:14:05.120"))
    else:  # a daemon started by hand, with no set_default_* command
        lines = [line for line in lines if "Cmd:set_default" not in line]
        lines.insert(7, start)
    config, _ = plugin_node(tmp_path, "".join(lines), server_atp=atp, default_atp=atp)
    report = json.loads(status(config, "--json").stdout)
    [server] = report["daemons"][0]["servers"]
    assert (server["started_before_limits"], server["verdict"]) == (False, "OK")
