"""Engines in network namespaces of their own, on a Kubernetes-shaped node the test builds as root
(tests/kit/podnet.py): three engine pods joined to a bridge, each running tests/kit/fakevllm.py as
`vllm serve Qwen/Qwen2.5-1.5B-Instruct --served-model-name qwen` on vLLM's default port 8000: pods A
and B on all addresses, pod C on 127.0.0.1 only. The agent sees only the test's processes (a
`visible` filter), first from the host's network namespace (hostNetwork), then from a pod network
namespace of its own on the same bridge (a DaemonSet without hostNetwork)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mpswatch.collectors.engines import EnginesCollector
from mpswatch.procfs import ProcFS

from tests.kit import fakevllm, podnet
from tests.kit.podnet import REPO, Pod, PodNetwork, PodNetworkRefused, descends_from


def engine_argv(host: str, tokens: int) -> list[str]:
    # tokens per request tell the pods' answers apart: A counts 100 a scrape, B 300, C 500
    return fakevllm.command(None, "qwen", "--host", host, "--tokens", str(tokens))


@pytest.fixture
def node():
    if os.geteuid() != 0:
        pytest.skip("network namespaces, bridges and veth pairs need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    try:
        network = PodNetwork()
    except PodNetworkRefused as refused:
        pytest.skip(f"the kernel refuses a bridge: {refused}")
    try:
        try:
            pods = {name: network.add_pod(name) for name in ("a", "b", "c")}
        except PodNetworkRefused as refused:
            pytest.skip(f"the kernel refuses a pod network namespace: {refused}")
        engines = {
            "a": network.start(pods["a"], engine_argv("0.0.0.0", 100)),
            "b": network.start(pods["b"], engine_argv("0.0.0.0", 300)),
            "c": network.start(pods["c"], engine_argv("127.0.0.1", 500)),
        }
        yield network, pods, {name: child.pid for name, child in engines.items()}
    finally:
        network.close()


def expected(pods: dict[str, Pod], pids: dict[str, int], privileged: bool = True) -> dict[str, tuple]:
    """name -> (url, up, pids, prompt tokens after two scrapes, error): the same for an agent anywhere;
    an unprivileged agent cannot read pod C's namespace link, so names it by its process."""
    namespace = f"network namespace {pods['c'].namespace_link()}" if privileged else \
        f"the network namespace of pid {pids['c']}"
    later = sorted(("a", "b", "c"), key=lambda pod: pids[pod])[1:]  # the first started keeps qwen:8000
    names = {pod: "qwen:8000" if pod not in later else f"qwen:8000@pid{pids[pod]}" for pod in pids}
    return {
        names["a"]: (f"http://{pods['a'].address}:8000/metrics", True, [pids["a"]], 150.0, None),
        names["b"]: (f"http://{pods['b'].address}:8000/metrics", True, [pids["b"]], 450.0, None),
        names["c"]: (None, False, [pids["c"]], None,
                     f"listens on 127.0.0.1:8000 inside {namespace}, which this agent cannot reach; "
                     "start it with --host 0.0.0.0"),
    }


def found(engines: list[dict]) -> dict[str, tuple]:
    return {e["name"]: (e["url"], e["up"], list(e["pids"]), e["prompt_tokens_total"], e["error"]) for e in engines}


def test_an_agent_in_the_host_namespace_scrapes_each_pod_at_its_ip_and_keeps_same_named_engines_apart(node):
    network, pods, pids = node
    collector = EnginesCollector(procfs=ProcFS(Path("/proc"), visible=descends_from(set(pids.values()))))
    collector.collect()
    time.sleep(0.3)
    engines = collector.collect().engines
    assert found([e.__dict__ for e in engines]) == expected(pods, pids)
    assert {e.model for e in engines if e.up} == {"qwen"}  # the same served name in both pods


def run_agent_in(agent: Pod, pids: dict[str, int], out_dir: Path, as_user: list[str] = ()) -> list[dict]:
    """The engines collector in a subprocess inside the agent's pod namespace (as another user with
    `as_user`: setpriv's arguments), seeing only the test's engines; what it found."""
    out = out_dir / "engines.json"
    done = subprocess.run(["ip", "netns", "exec", agent.netns, *as_user, sys.executable, "-m", "tests.kit.podnet", "collect",
                           str(out), *map(str, pids.values())],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_an_agent_in_a_pod_namespace_of_its_own_still_scrapes_both_pods_through_their_ips(node, tmp_path):
    network, pods, pids = node
    agent = network.add_agent_pod(pods["a"])
    assert found(run_agent_in(agent, pids, tmp_path)) == expected(pods, pids)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # no capabilities left either


def test_an_unprivileged_agent_in_a_pod_namespace_tells_the_pods_apart_by_their_sockets(node):
    # like the shipped DaemonSet (a uid of its own, every capability dropped): the engines' namespace
    # links and fd tables are closed to it, their socket tables and addresses are not
    network, pods, pids = node
    if shutil.which("setpriv") is None:
        pytest.skip("util-linux's setpriv is not installed")
    runs = subprocess.run([*NOBODY, sys.executable, "-c", f"import mpswatch; open({podnet.__file__!r}).close()"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    if runs.returncode != 0:
        pytest.skip(f"uid 65534 cannot run this test's interpreter and checkout: {runs.stderr.strip()[-200:]}")
    agent = network.add_agent_pod(pods["a"])
    with tempfile.TemporaryDirectory(prefix="mpswatch-netns-") as out_dir:  # pytest's tmp_path is root's alone
        os.chmod(out_dir, 0o777)
        assert found(run_agent_in(agent, pids, Path(out_dir), NOBODY)) == expected(pods, pids, privileged=False)
