"""Pods on a real GPU: two MPS clients started the way a kubelet runs two engine pods, each in a
network namespace and a mount namespace of its own, in a kubelet-style cgroup (the systemd driver's layout for
one, the cgroupfs driver's for the other), with its pod's HOSTNAME and service-account namespace,
beside a PodResources server that lists both pods with their GPU replicas. One client writes to an
illegal address while the other sits idle on the same server (both stay attached, so the server
stays in FAULT); `mpswatch status` names the pod MPS blames and the pods of every client that shared
the server.

Writes what it saw as JSON to $MPSWATCH_GPU_PODS_RESULTS when set (docs/validation.md quotes it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time

import pytest

from tests.gpu.results import results_saver
from tests.kit.agentproc import agent_env, mpswatch_cmd
from tests.kit.fakepodresources import FakePodResources
from tests.kit.kubecgroups import KubeCgroups, cgroupfs_path, systemd_path
from tests.kit.realmps import read_line, rest_of_output

RESULTS: dict = {}
_save_results = results_saver("MPSWATCH_GPU_PODS_RESULTS", RESULTS)
SECRETS = "/var/run/secrets/kubernetes.io/serviceaccount"


def gpu_uuid() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.split()[0]


def in_pod(hostname: str, namespace: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """argv in a network namespace of its own and a mount namespace whose service-account namespace
    file names `namespace`, with the pod's HOSTNAME; every step execs, so the PID is argv's. (MPS
    clients reach their daemon through the pipe dir's files, which no network namespace hides.)"""
    script = (f'mount -t tmpfs none "$(readlink -f /var/run)" && mkdir -p {SECRETS} && echo {namespace} > '
              f"{SECRETS}/namespace && exec {shlex.join(argv)}")
    return subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                            env={**env, "HOSTNAME": hostname}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def status(socket: str, *args: str) -> dict:
    run = subprocess.run(mpswatch_cmd("status", "--json", *args), capture_output=True, text=True, timeout=60,
                         env=agent_env({"MPSWATCH_PODS_POD_RESOURCES_SOCKET": socket}))
    assert run.returncode in (0, 1), run.stderr
    return json.loads(run.stdout)


def test_a_fatal_error_names_the_pod_mps_blames_and_every_client_s_pod(mps, mps_client, tmp_path):
    cgroups = KubeCgroups()
    version = next((v for v in ("v2", "v1") if v in cgroups.mounts), None)
    if os.geteuid() != 0 or version is None:
        pytest.skip("pod-style cgroups need root and a cgroup mount")
    uuid = gpu_uuid()
    pods = {"team-a/vllm-a": {"vllm": [f"{uuid}::0"]}, "team-b/vllm-b": {"main": [f"{uuid}::1"]}}
    socket = tmp_path / "kubelet.sock"
    mps.start()
    clients = []
    try:
        with FakePodResources(socket, pods):
            innocent = in_pod("vllm-a", "team-a", [mps_client, "idle", "20"], mps.env)
            clients.append(innocent)
            ready = read_line(innocent)
            if ready == "" and innocent.poll() is not None:
                pytest.skip(f"unshare --net --mount refused here: {innocent.stdout.read()}")
            assert ready.startswith("ready"), ready
            cgroups.place(innocent, version, systemd_path("11111111-aaaa-4bbb-8ccc-000000000001", "a" * 64))
            culprit = in_pod("vllm-b", "team-b", [mps_client, "fault", "20"], mps.env)
            clients.append(culprit)
            assert read_line(culprit).startswith("ready")
            cgroups.place(culprit, version, cgroupfs_path("22222222-aaaa-4bbb-8ccc-000000000002", "b" * 64))
            faulted_at = time.monotonic()
            args = ("--pipe-dir", str(mps.pipe_dir), "--log-dir", str(mps.log_dir))
            report: dict = {}
            while time.monotonic() - faulted_at < 30:
                report = status(str(socket), *args)
                if report.get("blast_radius"):
                    break
                time.sleep(0.5)
            RESULTS["seconds_to_blast_radius"] = round(time.monotonic() - faulted_at, 2)
            logged = [line for line in (mps.log_dir / "server.log").read_text().splitlines()
                      if "encountered a fatal GPU error" in line]
            RESULTS["server_log_fatal_line"] = logged[-1] if logged else None
            RESULTS["culprit_pid"], RESULTS["innocent_pid"] = culprit.pid, innocent.pid
            RESULTS["network_namespaces"] = {str(pid): os.readlink(f"/proc/{pid}/ns/net") for pid in (culprit.pid, innocent.pid)
                                             if os.path.exists(f"/proc/{pid}")} | {"agent": os.readlink("/proc/self/ns/net")}
            RESULTS["cgroups"] = {str(pid): open(f"/proc/{pid}/cgroup").read().strip() for pid in (culprit.pid, innocent.pid)
                                  if os.path.exists(f"/proc/{pid}")}
            RESULTS["blast_radius"] = report.get("blast_radius")
            RESULTS["problems"] = report.get("problems")
            RESULTS["client_pods"] = {str(c["pid"]): c.get("pod") for d in report.get("daemons", [])
                                      for s in d["servers"] for c in s["clients"]}
            [radius] = report["blast_radius"]
            pod_of = {culprit.pid: "team-b/vllm-b", innocent.pid: "team-a/vllm-a"}
            logged_pid = int(re.search(r"PID: (\d+)", logged[-1])[1])
            assert radius["blamed"]["pid"] == logged_pid in pod_of
            assert radius["blamed"]["pod"] == pod_of[logged_pid]
            shared = {c["pid"]: c["pod"] for c in radius["clients"]}
            assert shared and all(pod_of[pid] == pod for pid, pod in shared.items())
            assert innocent.pid in shared or culprit.pid in shared
            for client in clients:  # they exit on their own: killing an MPS client can hang its server
                RESULTS[f"exit_{'culprit' if client is culprit else 'innocent'}"] = rest_of_output(client)
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait(timeout=30)
        cgroups.close()
