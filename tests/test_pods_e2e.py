"""Pod identity on a kubelet-shaped node without a cluster: the test's own processes placed in
kubelet-style cgroups (tests/kit/kubecgroups.py: both driver layouts, cgroup v1 and v2, removed at the
end), a real PodResources gRPC server on a unix socket in the test's directory
(tests/kit/fakepodresources.py), and the collector seeing only the test's processes."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from mpswatch.analysis import health_report, render_text
from mpswatch.cli import main
from mpswatch.collectors.pods import PodsCollector
from mpswatch.exposition import render
from mpswatch.injection import Injected
from mpswatch.procfs import ProcFS
from mpswatch.scheduler import SnapshotStore
from mpswatch.snapshot import (
    CollectorReport,
    DaemonState,
    EnginesData,
    EngineState,
    GpuData,
    GpuProcess,
    GpuState,
    MpsClient,
    MpsControlData,
    MpsDaemon,
    MpsServer,
    frozen_map,
)

from tests.kit import fakenvml, fakevllm
from tests.kit.agentproc import REPO, agent_env, free_port, key
from tests.kit.fakepodresources import FakePodResources
from tests.kit.kubecgroups import KubeCgroups, cgroupfs_path, systemd_path
from tests.kit.snapshots import ok_status

GPU_A = "GPU-2ea0ea17-0206-eb44-6b1e-8d0c3f1a2b3c"  # shared through MPS replicas
GPU_B = "GPU-6d1c7e20-3f4a-4b5c-8d9e-0a1b2c3d4e5f"  # one pod's alone
H200 = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"  # tests.kit.fakenvml.h200's GPU
NODE = {
    "team-a/vllm-a": {"vllm": [f"{GPU_A}::0"], "proxy": []},
    "team-b/vllm-b": {"main": [GPU_B]},
    "team-c/vllm-c": {"main": [f"{GPU_A}::1"]},
    "team-d/batch-d": {"main": []},
}


def uid(n: int) -> str:
    return f"{n:08x}-5b7d-4c2e-9f00-1a2b3c4d5e6f"


def cid(n: int) -> str:
    return f"{n:02x}" * 32


@pytest.fixture
def cgroups():
    made = KubeCgroups.open("v1", "v2")
    yield made
    made.close()


@pytest.fixture(autouse=True)
def children():
    """Every child the test starts is killed at its end, placed in a cgroup or not."""
    yield STARTED
    while STARTED:
        child = STARTED.pop()
        child.kill()
        child.wait()


STARTED: list[subprocess.Popen] = []


def start(argv: list[str], hostname: str, namespace: str | None = None, **popen) -> subprocess.Popen:
    """A child with HOSTNAME set, as the runtime sets it; with `namespace`, in a mount namespace of its
    own whose /var/run/secrets/kubernetes.io/serviceaccount/namespace says it, as a pod's does."""
    env = {"PATH": os.environ["PATH"], "HOSTNAME": hostname, **popen.pop("env", {})}
    if namespace is None:
        STARTED.append(subprocess.Popen(argv, env=env, **popen))
        return STARTED[-1]
    secrets = "/var/run/secrets/kubernetes.io/serviceaccount"
    script = (f'mount -t tmpfs none "$(readlink -f /var/run)" && mkdir -p {secrets} && echo {namespace} > {secrets}/namespace'
              f" && exec {shlex.join(argv)}")
    child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env, **popen)
    STARTED.append(child)
    deadline = time.monotonic() + 10
    written = f"/proc/{child.pid}/root{os.path.realpath('/var/run')}/secrets/kubernetes.io/serviceaccount/namespace"
    while not os.path.exists(written) or \
            Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"unshare"):
        if child.poll() is not None or time.monotonic() > deadline:
            pytest.skip("a mount namespace of its own (unshare --mount) was refused here")
        time.sleep(0.02)
    return child


def sleeper(hostname: str, namespace: str | None = None) -> subprocess.Popen:
    return start(["sleep", "600"], hostname, namespace)


def test_info_series_and_status_name_the_pods_of_mps_clients_gpu_processes_and_engines(cgroups, tmp_path):
    a = sleeper("vllm-a", namespace="team-a")  # named by its environment
    b = sleeper("custom-host")  # the pod sets a hostname: named by the one container holding its GPU
    c = sleeper("vllm-c")  # no namespace file, on a GPU shared by two pods: its UID alone
    d = sleeper("batch-d")  # in a pod, on no GPU: no series
    e = sleeper("not-in-a-pod")  # on a GPU, in no pod: no series
    cgroups.place(a, "v2", systemd_path(uid(1), cid(1), qos="burstable"))
    cgroups.place(b, "v1", cgroupfs_path(uid(2), cid(2), qos="besteffort"))
    cgroups.place(c, "v2", systemd_path(uid(3), cid(3), qos=None, runtime="crio"))
    cgroups.place(d, "v1", cgroupfs_path(uid(4), cid(4), qos=None))
    pids = {p.pid for p in (a, b, c, d, e)}
    with FakePodResources(tmp_path / "kubelet.sock", NODE):
        pods = PodsCollector(pod_resources_socket=str(tmp_path / "kubelet.sock"),
                             procfs=ProcFS(visible=pids.__contains__)).collect()
    gpu = GpuData("580", (
        GpuState(0, GPU_A, "NVIDIA H200", True, processes=(GpuProcess(a.pid, "mps_client", 1 << 30),
                                                           GpuProcess(c.pid, "mps_client", 1 << 30))),
        GpuState(1, GPU_B, "NVIDIA H200", True, processes=(GpuProcess(b.pid, "exclusive", 1 << 30),
                                                           GpuProcess(e.pid, "exclusive", 1 << 30))),
    ))
    clients = tuple(MpsClient(p.pid, None, 77, GPU_A, "", "sleep") for p in (a, c))
    control = MpsControlData((MpsDaemon("/run/nvidia/mps/gpu/pipe", "device_plugin", DaemonState.UP, "answering",
                                        servers=(MpsServer(77, 0, "ACTIVE", 100.0),), clients=clients),), ())
    engines = EnginesData((EngineState("qwen-a:8000", "http://10.0.0.7:8000/metrics", "discovered", True, pids=(a.pid,)),),
                          frozen_map())
    store = SnapshotStore()
    for name, data in {"pods": pods, "gpu": gpu, "mps_control": control, "engines": engines}.items():
        store.publish(CollectorReport(ok_status(name), data))
    snapshot = store.current()

    samples = samples_of(render(snapshot, "test"))
    info = {dict(labels)["pid"]: dict(labels) for (name, labels), _ in samples.items() if name == "mps_pod_info"}
    assert info == {
        str(a.pid): {"pid": str(a.pid), "pod_uid": uid(1), "namespace": "team-a", "pod": "vllm-a", "container": "vllm"},
        str(b.pid): {"pid": str(b.pid), "pod_uid": uid(2), "namespace": "team-b", "pod": "vllm-b", "container": "main"},
        str(c.pid): {"pid": str(c.pid), "pod_uid": uid(3), "namespace": "", "pod": "", "container": ""},
    }
    assert samples[key("mps_engine_pod_info", engine="qwen-a:8000", pod_uid=uid(1), namespace="team-a", pod="vllm-a",
                       container="vllm")] == 1
    assert samples[key("mps_pod_resources_up")] == 1
    assert not any(name == "mps_pod_resources_failures_total" for name, _ in samples)

    report = health_report(snapshot, "test")
    client_pods = {c["pid"]: c["pod"] for d in report["daemons"] for s in d["servers"] for c in s["clients"]}
    assert client_pods == {a.pid: "team-a/vllm-a", c.pid: None}
    assert report["engines"][0]["pod"] == "team-a/vllm-a"
    text = render_text(report)
    assert "2 clients connected" in text  # healthy clients collapse to a count; their pods are in the JSON
    assert "engine qwen-a:8000 (pod team-a/vllm-a):" in text
    assert f"1 pod(s) of GPU processes or engines have no known name (UID {uid(3)})" in text


def samples_of(families) -> dict[tuple[str, frozenset], float]:
    """As tests.agentproc.parse_exposition gives a scrape: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def test_a_failing_kubelet_is_counted_by_reason_and_pods_named_before_keep_their_names(cgroups, tmp_path):
    b = sleeper("custom-host")
    cgroups.place(b, "v2", systemd_path(uid(2), cid(2), qos="besteffort", runtime="docker"))
    gpu = GpuData("580", (GpuState(1, GPU_B, "NVIDIA H200", True, processes=(GpuProcess(b.pid, "exclusive", 1 << 30),)),))
    store = SnapshotStore()
    store.publish(CollectorReport(ok_status("gpu"), gpu))
    with FakePodResources(tmp_path / "kubelet.sock", NODE) as kubelet:
        collector = PodsCollector(pod_resources_socket=str(tmp_path / "kubelet.sock"),
                                  procfs=ProcFS(visible={b.pid}.__contains__))
        store.publish(CollectorReport(ok_status("pods"), collector.collect()))
        kubelet.fail = grpc.StatusCode.PERMISSION_DENIED
        for _ in range(2):
            store.publish(CollectorReport(ok_status("pods"), collector.collect()))
    samples = samples_of(render(store.current(), "test"))
    assert samples[key("mps_pod_resources_up")] == 0
    assert samples[key("mps_pod_resources_failures_total", reason="permission_denied")] == 2
    assert samples[key("mps_pod_info", pid=str(b.pid), pod_uid=uid(2), namespace="team-b", pod="vllm-b", container="main")] == 1
    notes = health_report(store.current(), "test")["notes"]
    assert any("PodResources API" in n and "permission_denied: refused by the test" in n for n in notes)


def test_the_kubelet_socket_missing_gives_no_pod_resources_series(tmp_path):
    pods = PodsCollector(pod_resources_socket=str(tmp_path / "none.sock"), procfs=ProcFS(visible=lambda pid: False)).collect()
    store = SnapshotStore()
    store.publish(CollectorReport(ok_status("pods"), pods))
    names = {family.name for family in render(store.current(), "test")}
    assert not names & {"mps_pod_resources_up", "mps_pod_resources_failures", "mps_pod_info", "mps_engine_pod_info"}


AGENT_ONCE = textwrap.dedent("""
    import os, sys
    from mpswatch.cli import build_collectors
    from mpswatch.config import load_config
    from mpswatch.exposition import render
    from mpswatch.injection import Injected
    from mpswatch.scheduler import Scheduler, SnapshotStore
    tmp = sys.argv[2]
    env = {"MPSWATCH_PODS_POD_RESOURCES_SOCKET": sys.argv[1], "MPSWATCH_ENGINE_SCRAPE_DISCOVER": "false",
           "MPSWATCH_DEVICE_PLUGIN_ROOT": tmp + "/dp", "MPSWATCH_MPS_CONTROL_DEFAULT_PIPE_DIRS": tmp + "/pipe",
           "MPSWATCH_MPS_LOGS_DEFAULT_LOG_DIR": tmp + "/log"}
    collectors = build_collectors(load_config(None, env=env), Injected(process_filter=lambda root: lambda pid: pid == os.getpid()))
    snapshot = Scheduler(collectors, SnapshotStore()).run_once()
    render(snapshot, "test")
    print(snapshot.pods.pod_resources.up, sorted({m.split(".")[0] for m in sys.modules if m.startswith(("grpc", "google"))}))
""")


def test_without_the_kubelet_socket_the_agent_never_imports_grpc(tmp_path):
    def agent_once(socket: Path) -> str:
        run = subprocess.run([sys.executable, "-c", AGENT_ONCE, str(socket), str(tmp_path)], env=agent_env(),
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert run.returncode == 0, run.stderr
        return run.stdout.splitlines()[-1]  # after the log lines: NVML is missing here

    assert agent_once(tmp_path / "no-kubelet.sock") == "None []"
    with FakePodResources(tmp_path / "kubelet.sock", NODE):  # the same run with the socket there does import it
        up, loaded = agent_once(tmp_path / "kubelet.sock").split(" ", 1)
        assert up == "True" and {"google", "grpc"} <= set(ast.literal_eval(loaded))  # with grpcio-tools there, grpc_tools too


def test_mpswatch_status_names_the_pod_of_an_engine_in_a_kubepods_cgroup(cgroups, tmp_path, monkeypatch, capsys):
    """The whole agent as `mpswatch status` runs it: a vLLM-like engine found by its command line, on
    the fake H200 as an MPS client, its process in a pod's cgroup, its pod listed by the kubelet."""
    port = free_port()
    engine = start(fakevllm.command(port, "qwen-e"), "custom-host",
                   stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO / "agent")})
    assert engine.stdout.readline().strip() == "ready"
    cgroups.place(engine, "v2", systemd_path(uid(5), cid(5)))
    monkeypatch.setenv("FAKENVML_MPS_CLIENT_PIDS", str(engine.pid))
    config = tmp_path / "config.toml"
    config.write_text(f'device_plugin_root = "{tmp_path}/dp"\n[mps_control]\ndefault_pipe_dirs = ["{tmp_path}/pipe"]\n'
                      f'[mps_logs]\ndefault_log_dir = "{tmp_path}/log"\n'
                      f'[pods]\npod_resources_socket = "{tmp_path}/kubelet.sock"\n')
    injected = Injected(nvml_loader=fakenvml.h200, process_filter=lambda root: {engine.pid}.__contains__)
    reports = {}
    with FakePodResources(tmp_path / "kubelet.sock", {"team-e/qwen-e-0": {"vllm": [H200]}}):
        for form, flags in (("json", ["--json"]), ("text", [])):
            with pytest.raises(SystemExit):
                main(["status", *flags, "--config", str(config)], injected=injected)
            reports[form] = capsys.readouterr().out
    engines = json.loads(reports["json"])["engines"]
    assert [(e["name"], e["pod"]) for e in engines] == [(f"qwen-e:{port}", "team-e/qwen-e-0")]
    assert f"engine qwen-e:{port} (pod team-e/qwen-e-0):" in reports["text"]
