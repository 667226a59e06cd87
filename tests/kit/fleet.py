"""A simulated fleet of mpswatch nodes for one Prometheus: real expositions of a few node states,
rendered by the agent's own collectors on staged nodes (tests.kit.stagednode), served under many
node names from a few processes on loopback; Prometheus scrapes each name as its own `instance`
(`/metrics?node=NAME`, the blackbox exporter's relabelling) and remote-writes to VictoriaMetrics,
where vmalert evaluates the fleet rules (alerts/mpswatch-fleet.rules.yml).

    python -m tests.kit.fleet serve DIR PORT   # serves DIR/<state>.prom per DIR/assignment.json
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from mpswatch.exporter import cached_exposition
from mpswatch.exposition import render
from mpswatch.interference import Interference
from mpswatch.snapshot import NodeSnapshot, frozen_map

from tests.kit.agentproc import REPO, free_port
from tests.kit.fakecontrol import write_reply
from tests.kit.stagednode import node, settled_scheduler

PROMETHEUS = shutil.which("prometheus")
VICTORIA_METRICS = shutil.which("victoria-metrics")
VMALERT = shutil.which("vmalert")
FLEET_RULES = REPO / "alerts" / "mpswatch-fleet.rules.yml"


def _exposition(snapshot: NodeSnapshot) -> bytes:
    return cached_exposition(lambda: snapshot, lambda s: render(s, "fleet")).body()


def capture_states(shape: tuple[int, int, int], name: str) -> dict[str, bytes]:
    """The expositions of one staged node (GPUs, MPS clients per GPU, engines) in four states:
    healthy; a noisy neighbour (with two engines or more on a GPU); its MPS server in FAULT; the
    control daemon killed (the control program says none runs); `name` prefixes each state's key."""
    with node(name, *shape) as setup:
        scheduler = settled_scheduler(setup)
        healthy = scheduler.store.current()
        states = {f"{name}-healthy": _exposition(healthy)}
        noisy = _with_noisy_neighbour(healthy)
        if noisy is not None:
            states[f"{name}-noisy"] = _exposition(noisy)
        write_reply(setup["pipe"], "get_server_status 476", "FAULT\n")
        states[f"{name}-fault"] = _exposition(scheduler.run_once())
        shutil.rmtree(setup["pipe"] / "replies")
        (setup["pipe"] / "scenario.json").write_text(json.dumps({"mode": "not_running"}))
        states[f"{name}-daemon-down"] = _exposition(scheduler.run_once())
        return states


def _with_noisy_neighbour(snapshot: NodeSnapshot) -> NodeSnapshot | None:
    """The node as the agent renders it when the first engine of a GPU shared by two is slowed 2x
    while the second bursts (the staged engines' figures do not move, so the rule itself cannot
    find it there: tests/test_interference.py proves the rule)."""
    by_gpu: dict[str, list[str]] = {}
    for engine in snapshot.derived.engines:
        if engine.gpu_uuid is not None:
            by_gpu.setdefault(engine.gpu_uuid, []).append(engine.name)
    shared = next(((gpu, names) for gpu, names in sorted(by_gpu.items()) if len(names) >= 2), None)
    if shared is None:
        return None
    gpu, (slowed, bursting, *_) = shared
    interference = {slowed: Interference(gpu, 0.02, 0.01, 2.0, False, 0.0, bursting, 40_000.0),
                    bursting: Interference(gpu, None, None, None, True, 40_000.0)}
    return replace(snapshot, derived=replace(snapshot.derived, interference=frozen_map(interference)))


def assign(nodes: int, states: dict[str, float], clusters: int) -> dict[str, dict[str, str]]:
    """Node name -> its state and cluster: each state its share of the nodes (deterministic, spread
    evenly), each cluster a block of consecutive nodes (so that each has every state)."""
    names = [f"node-{i:05d}" for i in range(nodes)]
    order: list[str] = []
    credit = dict.fromkeys(states, 0.0)
    for _ in names:
        for state, share in states.items():
            credit[state] += share
        chosen = max(credit, key=lambda s: credit[s])
        credit[chosen] -= sum(states.values())
        order.append(chosen)
    return {name: {"state": state, "cluster": f"cluster-{i * clusters // nodes}"} for i, (name, state) in enumerate(zip(names, order))}


class _Answer(http.server.BaseHTTPRequestHandler):
    bodies: dict[str, bytes]

    def do_GET(self) -> None:
        name = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("node", [""])[0]
        body = self.bodies.get(name)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


def serve(directory: Path, port: int) -> None:
    assignment = json.loads((directory / "assignment.json").read_text())
    templates = {p.stem: p.read_bytes() for p in directory.glob("*.prom")}
    handler = type("Answer", (_Answer,), {"bodies": {name: templates[a["state"]] for name, a in assignment.items()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.request_queue_size = 1024
    server.serve_forever()


class FleetStack:
    """The servers, Prometheus, VictoriaMetrics and vmalert of one run, all on loopback under `work`."""

    def __init__(self, work: Path, templates: dict[str, bytes], assignment: dict[str, dict[str, str]],
                 servers: int = 2, scrape_interval: str = "15s", rule_interval: str = "15s",
                 prometheus_rules: bool = False) -> None:
        """`prometheus_rules`: Prometheus evaluates the fleet rules too (their results kept out of its
        remote write, so that the central store has vmalert's only)."""
        self.work = work
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        serving = work / "serving"
        serving.mkdir(parents=True)
        for state, body in templates.items():
            (serving / f"{state}.prom").write_bytes(body)
        (serving / "assignment.json").write_text(json.dumps(assignment))
        ports = [free_port() for _ in range(servers)]
        for i, port in enumerate(ports):
            self._spawn([sys.executable, "-m", "tests.kit.fleet", "serve", str(serving), str(port)], f"server-{i}")
        self.vm_port, self.prometheus_port, self.vmalert_port = free_port(), free_port(), free_port()
        self.victoria = f"http://127.0.0.1:{self.vm_port}"
        self.prometheus = f"http://127.0.0.1:{self.prometheus_port}"
        self._spawn([str(VICTORIA_METRICS), f"-storageDataPath={work / 'vm'}", f"-httpListenAddr=127.0.0.1:{self.vm_port}",
                     "-retentionPeriod=1d", "-search.latencyOffset=1s"], "victoria-metrics")
        groups: dict[tuple[int, str], list[str]] = {}
        for i, (name, a) in enumerate(sorted(assignment.items())):
            groups.setdefault((ports[i % servers], a["cluster"]), []).append(name)
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": rule_interval},
            "scrape_configs": [{
                "job_name": "mpswatch",
                "static_configs": [{"targets": names, "labels": {"__server__": f"127.0.0.1:{port}", "cluster": cluster}}
                                   for (port, cluster), names in sorted(groups.items())],
                "relabel_configs": [
                    {"source_labels": ["__address__"], "target_label": "__param_node"},
                    {"source_labels": ["__address__"], "target_label": "instance"},
                    {"source_labels": ["__server__"], "target_label": "__address__"},
                ],
            }],
            "remote_write": [{"url": f"{self.victoria}/api/v1/write", "write_relabel_configs": [
                {"source_labels": ["__name__"], "regex": "[a-z_]+:.+", "action": "drop"}]}],
            **({"rule_files": [str(FLEET_RULES)]} if prometheus_rules else {}),
        }))
        self._spawn([str(PROMETHEUS), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.prometheus_port}"], "prometheus")
        self._spawn([str(VMALERT), f"-rule={FLEET_RULES}", f"-datasource.url={self.victoria}",
                     f"-remoteWrite.url={self.victoria}", f"-evaluationInterval={rule_interval}",
                     f"-httpListenAddr=127.0.0.1:{self.vmalert_port}"], "vmalert")
        self.vmalert = f"http://127.0.0.1:{self.vmalert_port}"

    def _spawn(self, argv: list[str], name: str) -> None:
        with open(self.work / f"{name}.log", "ab") as out:
            self.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def query(self, base: str, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            reply = json.loads(answer.read())
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def close(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(Path(sys.argv[2]), int(sys.argv[3]))
