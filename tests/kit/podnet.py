"""A Kubernetes-shaped node's pod network, built by a test as root: a bridge in the host's network
namespace holding the subnet's first address (as a CNI bridge does), and pods, each a network
namespace joined to the bridge by a veth pair, `eth0` inside with an address of the subnet.

Names carry a random suffix and the subnet (10.231.X.0/24) is one no interface on the machine uses,
so concurrent runs do not collide; close() removes everything, processes first. Traffic goes only to
the subnet's addresses and loopback.

As a script, `python -m tests.kit.podnet collect OUT PID...` runs the engines collector twice, seeing only
those PIDs and their descendants, in whatever network namespace it is started in (`ip netns exec`),
and writes what it found to OUT as JSON: the agent as a DaemonSet pod without hostNetwork.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mpswatch.collectors.engines import EnginesCollector
from mpswatch.procfs import ProcFS, ppid_of, stat_fields

REPO = Path(__file__).resolve().parents[2]


class PodNetworkRefused(Exception):
    """The kernel or the user cannot make namespaces, bridges or veth pairs here."""


@dataclass
class Pod:
    netns: str  # the name `ip netns` knows it by
    address: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def namespace_link(self) -> str:
        """`net:[inode]`, as /proc/<pid>/ns/net of a process inside it reads."""
        return f"net:[{os.stat(f'/run/netns/{self.netns}').st_ino}]"


def ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise PodNetworkRefused("no `ip` program here (Debian's iproute2)") from None
    if done.returncode != 0:
        raise PodNetworkRefused(f"ip {' '.join(args)}: {done.stderr.strip()}")


class PodNetwork:
    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.subnet = self._free_subnet()
        self.bridge = f"mwb{self.suffix}"
        self.pods: list[Pod] = []
        self._links = [self.bridge]
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> str:
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
        used += subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=30).stdout
        free = [x for x in range(256) if f"10.231.{x}." not in used]
        if not free:
            raise PodNetworkRefused("every 10.231.X.0/24 is in use on this machine")
        return f"10.231.{random.choice(free)}"

    def add_pod(self, name: str) -> Pod:
        index = len(self.pods) + 1
        pod = Pod(f"mw{self.suffix}-{name}", f"{self.subnet}.{10 + index}")
        host_end, pod_end = f"mwh{self.suffix}{index}", f"mwp{self.suffix}{index}"
        ip("netns", "add", pod.netns)
        self.pods.append(pod)
        ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end, "netns", pod.netns)
        self._links.append(host_end)
        ip("link", "set", host_end, "master", self.bridge, "up")
        ip("-n", pod.netns, "link", "set", pod_end, "name", "eth0")
        ip("-n", pod.netns, "addr", "add", f"{pod.address}/24", "dev", "eth0")
        ip("-n", pod.netns, "link", "set", "lo", "up")
        ip("-n", pod.netns, "link", "set", "eth0", "up")
        ip("-n", pod.netns, "route", "add", "default", "via", f"{self.subnet}.1")
        return pod

    def add_agent_pod(self, reaching: Pod, port: int = 8000) -> Pod:
        """A pod for an agent without hostNetwork, once it reaches `reaching`'s engine on `port`;
        skips the test where the machine filters traffic between bridged namespaces."""
        agent = self.add_pod("agent")
        probe = subprocess.run(["ip", "netns", "exec", agent.netns, sys.executable, "-c",
                                f"import socket; socket.create_connection(('{reaching.address}', {port}), 5).close()"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"this machine filters traffic between bridged namespaces: {probe.stderr.strip()[-200:]}")
        return agent

    def start(self, pod: Pod, argv: list[str], timeout: float = 30.0) -> subprocess.Popen[str]:
        """Runs argv inside the pod (`ip netns exec` execs it: the PID is argv's) and waits for the
        line `ready` on its stdout."""
        child = subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, cwd=REPO)
        pod.processes.append(child)
        assert child.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"{argv} in {pod.netns}: not ready within {timeout:g} s")
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{argv} in {pod.netns}: {line!r} {child.stdout.read() if child.poll() is not None else ''}")
        return child

    def close(self) -> None:
        """Every process of every pod, then the namespaces, then the links; whatever failed before."""
        for pod in self.pods:
            for child in pod.processes:
                if child.poll() is None:
                    child.kill()
                child.wait(timeout=10)
                if child.stdout is not None:
                    child.stdout.close()
            left = subprocess.run(["ip", "netns", "pids", pod.netns], capture_output=True, text=True, timeout=30)
            for pid in left.stdout.split():  # anything else still inside our namespace is ours
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, timeout=30)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)


def descends_from(roots: set[int]) -> Callable[[int], bool]:
    """A ProcFS `visible` filter: the processes `roots` and their descendants, nothing else."""

    def visible(pid: int) -> bool:
        for _ in range(64):
            if pid in roots:
                return True
            try:
                parent = ppid_of(stat_fields(Path(f"/proc/{pid}/stat").read_text(errors="replace")))
            except OSError:
                return False
            if parent is None or parent <= 1:
                return False
            pid = parent
        return False

    return visible


def collect(out: Path, roots: set[int]) -> None:
    collector = EnginesCollector(procfs=ProcFS(Path("/proc"), visible=descends_from(roots)))
    collector.collect()
    time.sleep(0.3)
    engines = collector.collect().engines
    keys = ("name", "url", "up", "error", "pids", "prompt_tokens_total", "model")
    out.write_text(json.dumps([{k: getattr(e, k) for k in keys} for e in engines]))


if __name__ == "__main__":
    if sys.argv[1:2] != ["collect"] or len(sys.argv) < 4:
        sys.exit("usage: python -m tests.kit.podnet collect OUT PID...")
    collect(Path(sys.argv[2]), {int(pid) for pid in sys.argv[3:]})
