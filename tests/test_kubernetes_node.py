"""One Kubernetes-shaped node, end to end, without a cluster (issue 16's "How to prove it"), built by
the test as root and removed at the end, also on failure:

  - two engine pods, each a network namespace joined to a bridge (tests/kit/podnet.py), both running
    the fake vLLM (tests/kit/fakevllm.py) on 0.0.0.0:8000 with the same served model name; each
    engine process in a kubelet-style cgroup (tests/kit/kubecgroups.py: pod A in the systemd
    driver's layout, pod B in the cgroupfs driver's), with HOSTNAME and, in a mount namespace of its
    own, the service-account namespace file of its pod; CUDA_MPS_PIPE_DIRECTORY in their environment;
  - a real PodResources gRPC server listing both pods on a socket in the test's dir;
  - MPS from the fake control daemon (scenario server_fault_driver580), whose MPS clients are the two
    engines, and a server.log in which MPS blames pod B's engine for a fatal GPU error;
  - the agent under test (seeing only this session's processes) in the host's network namespace
    (hostNetwork) and in a pod network namespace of its own on the bridge (a DaemonSet without it);
  - with the daemon gone, Debian's Prometheus (the shipped rules) and Alertmanager (the shipped
    example, its webhooks pointed at the test) on loopback, paging MPSExpectedButNoDaemon.

Traffic goes only to loopback and to the addresses of the namespaces the test made.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.kit import fakevllm, scope
from tests.kit.agentproc import REPO, Agent, agent_env, free_port, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon
from tests.kit.fakepodresources import FakePodResources
from tests.kit.kubecgroups import KubeCgroups, cgroupfs_path, systemd_path
from tests.kit.podnet import Pod, PodNetwork, PodNetworkRefused
from tests.kit.replaystack import ALERTMANAGER, ALERTS, PROMETHEUS

H200 = "GPU-b0364874-2b6d-037a-0496-f04da35f2f2d"  # tests.kit.fakenvml's H200
LOGS = REPO / "tests" / "fixtures" / "h200-driver580"
SECRETS = "/var/run/secrets/kubernetes.io/serviceaccount"
PODS = {"a": ("team-a", "vllm-a"), "b": ("team-b", "vllm-b")}  # pod B's engine is the one MPS blames
UIDS = {"a": "0000000a-5b7d-4c2e-9f00-1a2b3c4d5e6f", "b": "0000000b-5b7d-4c2e-9f00-1a2b3c4d5e6f"}


@dataclass
class Node:
    tmp: Path
    network: PodNetwork
    pods: dict[str, Pod]
    pids: dict[str, int]
    daemon: FakeDaemon
    log_dir: Path
    config: Path

    def pod_name(self, which: str) -> str:
        return "/".join(PODS[which])


def engine_argv(which: str, pipe_dir: str) -> list[str]:
    """The engine's command line as its pod runs it: a clean environment (HOSTNAME, the MPS pipe dir,
    the session's marker), then a mount namespace of its own whose service-account namespace file
    names the pod's namespace; exec all the way down, so the PID is the engine's."""
    namespace, name = PODS[which]
    engine = fakevllm.command(None, "qwen", "--host", "0.0.0.0")
    script = (f'mount -t tmpfs none "$(readlink -f /var/run)" && mkdir -p {SECRETS} && echo {namespace} > {SECRETS}/namespace'
              f" && exec {shlex.join(engine)}")
    return ["env", "-i", f"PATH={os.environ['PATH']}", f"HOSTNAME={name}", f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}",
            f"{scope.VARIABLE}={scope.DIRECTORY}",
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def fault_log(log_dir: Path, blamed_pid: int) -> None:
    """The H200's session 2 server.log, its server PID made 632 (the scenario's server in FAULT) and
    the client it blames made `blamed_pid`."""
    log_dir.mkdir()
    text = (LOGS / "session2-fault-server.log").read_text()
    (log_dir / "server.log").write_text(text.replace("   440] ", "   632] ").replace("PID: 513,", f"PID: {blamed_pid},"))


def mps_clients(pids: dict[str, int]) -> str:
    """The scenario's `ps` answer with the engines as its clients: pod A's the innocent 629, pod B's the
    blamed 513, in this machine's PID namespace."""
    pid_ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")
    head = "PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND        \n"
    row = "{:<10}{:<10}632            GPU-9ce49c92-f91f-680e    {:<15}python3        \n"
    return head + row.format(pids["a"], 1, pid_ns) + row.format(pids["b"], 2, pid_ns)


@pytest.fixture
def node(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces, bridges, cgroups and mount namespaces need root")
    for program in ("ip", "unshare", "mount"):
        if shutil.which(program) is None:
            pytest.skip(f"`{program}` is not installed")
    cgroups = KubeCgroups.open("v2")
    daemon = FakeDaemon(tmp_path / "mps", "server_fault_driver580")
    network = None
    try:
        try:
            network = PodNetwork()
            pods = {which: network.add_pod(which) for which in PODS}
        except PodNetworkRefused as refused:
            pytest.skip(f"the kernel refuses a pod network: {refused}")
        engines = {}
        for which, pod in pods.items():
            try:
                engines[which] = network.start(pod, engine_argv(which, daemon.path))
            except RuntimeError as refused:
                pytest.skip(f"an engine pod's mount namespace (unshare --mount, tmpfs) was refused here: {refused}")
        cgroups.place(engines["a"], "v2", systemd_path(UIDS["a"], "aa" * 32, qos="burstable"))
        cgroups.place(engines["b"], "v1" if "v1" in cgroups.mounts else "v2",
                      cgroupfs_path(UIDS["b"], "bb" * 32, qos="besteffort"))
        pids = {which: child.pid for which, child in engines.items()}
        replies = {**daemon.scenario["replies"], "ps": mps_clients(pids)}
        daemon.update(replies=replies)
        log_dir = tmp_path / "log"
        fault_log(log_dir, pids["b"])
        config = tmp_path / "config.toml"
        config.write_text(f'device_plugin_root = "{tmp_path}/dp"\n'
                          f'[mps_control]\ndefault_pipe_dirs = ["{tmp_path}/no-default-pipe-dir"]\n'
                          f'[mps_logs]\nlog_dirs = ["{log_dir}"]\ntimezone = "UTC"\n'
                          f'[pods]\npod_resources_socket = "{tmp_path}/kubelet.sock"\n')
        kubelet = {f"{ns}/{name}": {"vllm": [f"{H200}::{i}"]} for i, (ns, name) in enumerate(PODS.values())}
        with FakePodResources(tmp_path / "kubelet.sock", kubelet):
            yield Node(tmp_path, network, pods, pids, daemon, log_dir, config)
    finally:
        cgroups.close()
        if network is not None:
            network.close()
        daemon.close()


def status_json(node: Node, *args: str, netns: str | None = None) -> dict:
    """`mpswatch status --json` as an agent under test, in the host's network namespace or in `netns`."""
    argv = mpswatch_cmd("status", "--json", "--config", str(node.config), "--mps-control-bin", FAKE_CONTROL, *args,
                        nvml="h200_all_mps")
    run = subprocess.run([*(["ip", "netns", "exec", netns] if netns else []), *argv], env=agent_env(),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.stdout, run.stderr
    return json.loads(run.stdout)


def engines_of(report: dict) -> dict[str, tuple]:
    return {e["pod"]: (e["name"], e["url"], e["up"], e["pids"]) for e in report["engines"]}


def expected_engines(node: Node) -> dict[str, tuple]:
    """Pod -> (name, url, up, pids): the first started keeps `qwen:8000`, the other is told apart by its PID."""
    first = min(node.pids.values())
    return {node.pod_name(w): ("qwen:8000" if pid == first else f"qwen:8000@pid{pid}",
                               f"http://{node.pods[w].address}:8000/metrics", True, [pid])
            for w, pid in node.pids.items()}


def assert_blast_radius(node: Node, report: dict) -> None:
    [blast] = report["blast_radius"]
    assert (blast["pipe_dir"], blast["server_pid"], blast["state"], blast["verdict"]) == (node.daemon.path, 632, "fault", "DOWN")
    assert blast["blamed"]["pid"] == node.pids["b"] and blast["blamed"]["pod"] == node.pod_name("b")
    assert blast["fatal_error"]["client_pid"] == node.pids["b"] and blast["fatal_error"]["log_dir"] == str(node.log_dir)
    assert sorted((c["pid"], c["pod"], c["blamed"]) for c in blast["clients"]) == sorted(
        [(node.pids["a"], node.pod_name("a"), False), (node.pids["b"], node.pod_name("b"), True)])


def wait_for_status(node: Node, check, *args: str, netns: str | None = None, timeout: float = 10.0) -> dict:
    """Runs status until `check(report)` passes (engines are scraped twice before they count as up)."""
    deadline = time.monotonic() + timeout
    while True:
        report = status_json(node, *args, netns=netns)
        try:
            check(report)
            return report
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_status_on_the_host_network_names_both_same_named_engines_pods_and_the_pod_mps_blames(node):
    def check(report):
        assert engines_of(report) == expected_engines(node)
        assert_blast_radius(node, report)

    report = wait_for_status(node, check)
    assert {e["model"] for e in report["engines"]} == {"qwen"}


def test_a_running_agent_exports_each_engine_up_with_its_pod(node):
    names = {pod: name for pod, (name, *_) in expected_engines(node).items()}
    with Agent(["--config", str(node.config), "--mps-control-bin", FAKE_CONTROL, "--interval", "0.5"],
               nvml="h200_all_mps") as agent:
        def ready(samples):
            return all(samples.get(key("mps_engine_up", engine=name)) == 1 and
                       key("mps_engine_pipe_dir_served", engine=name) in samples for name in names.values()) and samples

        samples = agent.wait_for(ready, timeout=15)
    for which in PODS:
        namespace, pod = PODS[which]
        labels = {"engine": names[node.pod_name(which)], "pod_uid": UIDS[which], "namespace": namespace, "pod": pod,
                  "container": "vllm"}
        assert samples[key("mps_engine_pod_info", **labels)] == 1
        assert samples[key("mps_engine_pipe_dir_served", engine=names[node.pod_name(which)])] == 1  # its daemon answers
    assert samples[key("mps_control_expected", reason="engine_pipe_dir")] == 1


def test_an_agent_in_a_pod_network_of_its_own_finds_the_same_engines_pods_and_blamed_pod(node):
    agent = node.network.add_agent_pod(node.pods["a"])

    def check(report):
        assert engines_of(report) == expected_engines(node)
        assert_blast_radius(node, report)

    wait_for_status(node, check, netns=agent.netns)


def one_scrape(node: Node, control_bin: str = FAKE_CONTROL, daemon_state: str | None = None) -> dict:
    """The agent's exposition once it has scraped both engines (and, with `daemon_state`, once the
    daemon is reported in that state)."""
    def ready(samples):
        engines_up = sum(1 for (name, _), v in samples.items() if name == "mps_engine_up" and v == 1) == 2
        state = daemon_state is None or any(name == "mps_control_state" and dict(labels).get("state") == daemon_state
                                            and v == 1 for (name, labels), v in samples.items())
        return engines_up and state and samples

    with Agent(["--config", str(node.config), "--mps-control-bin", control_bin, "--interval", "0.5"],
               nvml="h200_all_mps") as agent:
        return agent.wait_for(ready, timeout=15)


def test_engines_asking_for_mps_with_no_daemon_at_all_make_mps_expected_with_none_found(node):
    node.daemon.close()
    shutil.rmtree(node.daemon.pipe_dir)
    samples = one_scrape(node)
    assert samples[key("mps_control_daemons")] == 0
    assert samples[key("mps_control_expected", reason="engine_pipe_dir")] == 1


def test_with_the_control_program_missing_whether_the_pipe_dir_is_served_is_unknown_never_0(node):
    samples = one_scrape(node, "/nonexistent", daemon_state="exec_failed")
    assert samples[key("mps_control_daemons")] == 1  # the daemon is there, only it cannot be asked
    assert not [labels for (name, labels) in samples if name == "mps_engine_pipe_dir_served"]



def rules_with_for_cut(path: Path, alert: str) -> dict:
    """The shipped rule file, `alert`'s `for` cut to 1 s (Prometheus cannot be hurried through 3 minutes;
    alerts/tests/ prove the 3 minutes with promtool): its expression and labels as shipped."""
    rules = yaml.safe_load((ALERTS / "mpswatch.rules.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    rule["for"] = "1s"
    path.write_text(yaml.safe_dump(rules))
    return rule


@pytest.mark.skipif(not (PROMETHEUS and ALERTMANAGER), reason="needs Debian's prometheus and prometheus-alertmanager")
def test_engines_asking_for_mps_with_no_daemon_page_through_prometheus_and_alertmanager(node):
    from tests.test_alerts_e2e import Receiver, _query, wait_until

    node.daemon.close()
    shutil.rmtree(node.daemon.pipe_dir)
    work, receiver, processes = node.tmp, Receiver(), []
    try:
        with Agent(["--config", str(node.config), "--mps-control-bin", FAKE_CONTROL, "--interval", "0.5"],
                   nvml="h200_all_mps", log_path=work / "agent.log") as agent:
            rule = rules_with_for_cut(work / "rules.yml", "MPSExpectedButNoDaemon")
            am_config = yaml.safe_load((ALERTS / "alertmanager.example.yml").read_text())
            for receiver_config in am_config["receivers"]:
                for hook in receiver_config["webhook_configs"]:
                    hook["url"] = receiver.url + urllib.parse.urlsplit(hook["url"]).path
            am_config["route"].update(group_wait="1s", group_interval="1s")
            (work / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
            am_port, prom_port = free_port(), free_port()
            processes.append(subprocess.Popen(
                [ALERTMANAGER, f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'am'}",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                stdout=subprocess.DEVNULL, stderr=open(work / "alertmanager.log", "wb")))
            (work / "prometheus.yml").write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(work / "rules.yml")],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{"job_name": "mpswatch", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}],
            }))
            processes.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb")))
            prometheus = f"http://127.0.0.1:{prom_port}"
            wait_until(lambda: _query(prometheus, 'mps_control_expected{reason="engine_pipe_dir"}') == [1.0], 60,
                       "Prometheus scraping the agent: MPS expected because the engines set a pipe dir")
            assert _query(prometheus, "mps_control_daemons") == [0.0]
            firing = wait_until(lambda: receiver.alerts("/pager", "MPSExpectedButNoDaemon", "firing"), 60,
                                "MPSExpectedButNoDaemon delivered to the pager")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        receiver.server.shutdown()
    labels = firing[0]["labels"]
    assert (labels["severity"], labels["reason"]) == ("critical", "engine_pipe_dir")
    assert labels["instance"] == f"127.0.0.1:{agent.port}"
    assert firing[0]["annotations"]["runbook_url"] == f"http://127.0.0.1:{agent.port}/runbooks#mpsexpectedbutnodaemon"
    assert rule["expr"] == "mps_control_expected == 1 and on (instance) mps_control_daemons == 0"
