"""The fleet rules and the fleet dashboard against real components, small: 20 simulated nodes
(real expositions of a staged node, healthy, with its MPS server in FAULT, with its daemon killed)
scraped by Prometheus, remote-written to VictoriaMetrics, rolled up there by vmalert with
alerts/mpswatch-fleet.rules.yml, and by Prometheus itself with the same file. benchmarks/fleet.py runs the same with 1,000 nodes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.kit import fleet
from tests.kit.agentproc import parse_exposition
from tests.kit.stagednode import NODES

ROOT = Path(__file__).resolve().parent.parent
SHARES = {"reference-healthy": 0.5, "reference-noisy": 0.1, "reference-fault": 0.2, "reference-daemon-down": 0.2}

pytestmark = pytest.mark.skipif(
    not (fleet.PROMETHEUS and fleet.VICTORIA_METRICS and fleet.VMALERT),
    reason="needs prometheus, victoria-metrics and vmalert (Debian packages prometheus, victoria-metrics; "
           "the README's test command installs them)")


def problems_of(exposition: bytes) -> dict[str, float]:
    """What the fleet rules count on one node, computed here from its exposition."""
    samples = parse_exposition(exposition.decode())

    def values(name: str, **labels: str) -> list[float]:
        return [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]

    return {
        "daemons_down": sum(1 - v for v in values("mps_control_up")),
        "servers_fault": sum(values("mps_server_status", status="FAULT")),
        "engines_down": sum(1 - v for v in values("mps_engine_up")),
        "engines_without_mps": sum(1 - v for v in values("mps_engine_mps_attached")),
        "collectors_failing": sum(1 - v for v in values("mps_exporter_collector_success")),
    }


def slowed_by_neighbour(exposition: bytes) -> int:
    """Engines the noisy-neighbour rollup counts on one node: slowed 1.5 times or more."""
    samples = parse_exposition(exposition.decode())
    return sum(1 for (name, _), value in samples.items() if name == "mps_engine_interference_slowdown_ratio" and value >= 1.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    templates = fleet.capture_states(NODES["reference"], "reference")
    assignment = fleet.assign(20, SHARES, clusters=2)
    stack = fleet.FleetStack(tmp_path_factory.mktemp("fleet"), templates, assignment, scrape_interval="1s", rule_interval="1s",
                             prometheus_rules=True)
    try:
        yield stack, templates, assignment
    finally:
        stack.close()


def wait_for(check, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last is True:
                return
        except (OSError, AssertionError) as err:
            last = err
        time.sleep(1.0)
    raise AssertionError(f"not within {timeout} s; last: {last}")


def test_the_fleet_rules_roll_each_cluster_up_as_its_nodes_expositions_say(stack):
    stack, templates, assignment = stack
    per_node = {name: problems_of(templates[a["state"]]) for name, a in assignment.items()}
    assert Counter(a["state"] for a in assignment.values()) == Counter({"reference-healthy": 10, "reference-noisy": 2,
                                                                         "reference-fault": 4, "reference-daemon-down": 4})
    expected = {}
    for cluster in sorted({a["cluster"] for a in assignment.values()}):
        mine = [per_node[n] for n, a in assignment.items() if a["cluster"] == cluster]
        expected[cluster] = {
            "cluster:mps_exporter_nodes:count": len(mine),
            "cluster:mps_control_daemons_down:sum": sum(p["daemons_down"] for p in mine),
            "cluster:mps_servers_fault:sum": sum(p["servers_fault"] for p in mine),
            "cluster:mps_nodes_with_problems:count": sum(1 for p in mine if sum(p.values()) > 0),
            "cluster:mps_engines_slowed_by_neighbour:sum": sum(slowed_by_neighbour(templates[assignment[n]["state"]])
                                                               for n, a in assignment.items() if a["cluster"] == cluster),
        }
    assert all(e["cluster:mps_servers_fault:sum"] == 2 and e["cluster:mps_control_daemons_down:sum"] == 2
               and e["cluster:mps_engines_slowed_by_neighbour:sum"] == 1
               for e in expected.values())  # the states are what they claim to be

    def rolled_up(store: str):
        found = {cluster: {record: None for record in records} for cluster, records in expected.items()}
        for record in expected["cluster-0"]:
            for series in stack.query(store, record):
                found[series["metric"]["cluster"]][record] = float(series["value"][1])
        return True if found == expected else found

    wait_for(lambda: rolled_up(stack.victoria))  # vmalert's evaluation, in the central store
    wait_for(lambda: rolled_up(stack.prometheus))  # Prometheus's own evaluation of the same file


@pytest.mark.parametrize("store", ["victoria", "prometheus"])
def test_every_fleet_dashboard_query_answers_from_the_central_store_and_from_prometheus(stack, store):
    stack, _, _ = stack
    base = getattr(stack, store)
    dashboard = json.loads((ROOT / "dashboards" / "fleet.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    wait_for(lambda: stack.query(base, "cluster:mps_nodes_with_problems:count") != [] or None)
    empty = []
    for title, expr in queries:
        expr = re.sub(r"\$\w+", ".*", expr)
        if not stack.query(base, expr):
            empty.append(title)
    # the healthy states have no imbalance above 1.5 and no GPU where MPS likely costs throughput
    assert set(empty) <= {"Most imbalanced GPUs", "GPUs where MPS likely costs throughput"}, empty
    [watched] = stack.query(base, 'sum(cluster:mps_exporter_nodes:count{cluster=~".*"})')
    assert float(watched["value"][1]) == 20


def test_the_shipped_fleet_rules_are_what_the_generator_writes_and_take_a_label_and_a_selector():
    checked = subprocess.run([str(shutil.which("promtool")), "check", "rules", str(fleet.FLEET_RULES)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    run = subprocess.run([sys.executable, str(ROOT / "alerts" / "fleet.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, str(ROOT / "alerts" / "fleet.py"), "--by", "region", "--selector", 'job="gpu"'],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "region:mps_servers_fault:sum" in run.stdout
    assert 'mps_server_status{job="gpu",status="FAULT"}' in run.stdout and "sum by (region, instance)" in run.stdout
