"""The shipped systemd units against a real GPU node, without systemd: their DeviceAllow= classes
cover the node's NVIDIA device nodes, and the MPS daemon works inside nvidia-mps.service's capability
bounding set, with no_new_privs and its umask, serving a client of another user."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.kit.realmps import MpsDaemon, read_line, rest_of_output

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def directives(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in (UNITS / unit).read_text().splitlines()
            if line.startswith(key + "=")]


def char_majors() -> dict[int, set[str]]:
    """/proc/devices' character devices: major -> its names (what DeviceAllow=char-<name> looks up: a
    class allows every major one of whose names matches, all its minors; the H200's driver lists 195
    as both `nvidia` and `nvidiactl`)."""
    text = Path("/proc/devices").read_text().split("Block devices:")[0]
    majors: dict[int, set[str]] = {}
    for major, name in re.findall(r"^\s*(\d+) (\S+)$", text, re.M):
        majors.setdefault(int(major), set()).add(name)
    return majors


def nvidia_nodes() -> list[Path]:
    nodes = [*Path("/dev").glob("nvidia*"), *Path("/dev/nvidia-caps").glob("*")]
    return sorted(p for p in nodes if p.exists() and stat.S_ISCHR(p.stat().st_mode))


@pytest.mark.parametrize("unit,needed", [
    ("mpswatch.service", r"nvidiactl|nvidia\d+"),  # NVML
    ("nvidia-mps.service", r"nvidiactl|nvidia\d+|nvidia-uvm(-tools)?|nvidia-cap\d+"),
    ("vllm@.service", r"nvidiactl|nvidia\d+|nvidia-uvm(-tools)?|nvidia-cap\d+"),
])
def test_the_units_device_classes_cover_the_nodes_they_need(unit, needed):
    classes = [value.split()[0].removeprefix("char-") for value in directives(unit, "DeviceAllow")]
    majors = char_majors()
    nodes = [p for p in nvidia_nodes() if re.fullmatch(needed, p.name)]
    assert any(re.fullmatch(r"nvidia\d+", p.name) for p in nodes), f"no /dev/nvidia<N> here: {nvidia_nodes()}"
    uncovered = {}
    for node in nodes:
        names = majors.get(os.major(node.stat().st_rdev), set())
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in classes):
            uncovered[str(node)] = sorted(names)
    assert not uncovered, f"{unit}: DeviceAllow={classes} misses {uncovered} (/proc/devices: {majors})"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_the_mps_daemon_serves_another_users_client_within_its_units_privileges(mps_client):
    """The daemon as nvidia-mps.service runs it (root, CapabilityBoundingSet=, NoNewPrivileges=,
    UMask=), a client as uid 65534: the daemon starts that user's server, the client runs, and the
    logs stay readable to the agent's user."""
    caps = directives("nvidia-mps.service", "CapabilityBoundingSet")[0].split()
    bounding = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in caps)])
    [umask] = directives("nvidia-mps.service", "UMask")
    root = Path(tempfile.mkdtemp(prefix="mpswatch-units-"))  # /tmp: reachable by uid 65534, unlike pytest's tmp
    root.chmod(0o755)
    client_bin = root / "mps_client"
    shutil.copy(mps_client, client_bin)
    client_bin.chmod(0o755)
    daemon = MpsDaemon(root)
    try:
        subprocess.run(["setpriv", "--bounding-set", bounding, "--no-new-privs", "--", "nvidia-cuda-mps-control", "-d"],
                       env=daemon.env, check=True, timeout=30, umask=int(umask, 8))
        deadline = time.monotonic() + 15
        while not daemon.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = Path(f"/proc/{daemon.pid_file.read_text().strip()}/status").read_text()
        [bounding_hex] = re.findall(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M)
        assert int(bounding_hex, 16).bit_count() == len(caps) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)

        client = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--",
                                   str(client_bin), "hold", "5"],
                                  env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = read_line(client, timeout=60)
        assert line.startswith("ready"), line + rest_of_output(client)
        servers = daemon.control("get_server_list").stdout.split()
        assert servers, "the client runs, but not under MPS"
        server_status = Path(f"/proc/{servers[0]}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s", server_status, re.M), "the server should run as its client's user"
        assert rest_of_output(client, timeout=60) == "done" and client.returncode == 0
        for log in daemon.log_dir.glob("*.log"):
            assert log.stat().st_mode & 0o004, f"{log} is not readable by the agent's user"
    finally:
        daemon.cleanup()
        shutil.rmtree(root, ignore_errors=True)
