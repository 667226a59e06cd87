"""The series budget of docs/metrics.md ("Series per node"), held on the large staged node (8 GPUs,
48 MPS clients each, 16 engines): every group of series within its budget per member, and no series
with more labels than the stated maximum."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from mpswatch.exposition import render
from mpswatch.logsetup import configure_logging
from mpswatch.snapshot import NodeSnapshot

from tests.kit.stagednode import NODES, node, settled_scheduler

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_budget() -> tuple[dict[str, int], int]:
    """Group -> series per member, and the most labels a series may have, from docs/metrics.md."""
    section = DOCS.read_text().split("## Series per node", 1)[1].split("\n## ", 1)[0]
    per_member = {group: int(budget) for group, budget in re.findall(r"^\| ([a-z_ ]+?) \| [^|]+ \| (\d+) \|", section, re.MULTILINE)}
    [max_labels] = re.findall(r"at most (\d+) labels", section)
    return per_member, int(max_labels)


# families whose `pid` is not a process of their own: a daemon's PID, a faulted server's blamed client
_OWN_GROUP = {"mps_control_info": "daemon", "mps_fault_blamed_client_info": "server"}


def group_of(family: str, labels: set[str]) -> str:
    """The rule docs/metrics.md states: the first that matches."""
    if family in _OWN_GROUP:
        return _OWN_GROUP[family]
    if "pid" in labels:
        return "process"
    if "engine" in labels:
        return "engine"
    if "log_dir" in labels:
        return "log dir"
    if "server_pid" in labels or {"pipe_dir", "uid"} <= labels:
        return "server"
    if "pipe_dir" in labels:
        return "daemon"
    if labels & {"gpu", "gpu_uuid"}:
        return "gpu"
    return "node"


def members(snapshot: NodeSnapshot) -> Counter[str]:
    """How many of each group the node has, from what the agent found."""
    assert snapshot.mps_control is not None and snapshot.gpu is not None
    assert snapshot.engines is not None and snapshot.mps_logs is not None
    daemons = snapshot.mps_control.daemons
    pids = {c.pid for d in daemons for c in d.clients or ()}
    pids |= {p.pid for g in snapshot.gpu.gpus for p in g.processes or ()}
    return Counter({"node": 1, "daemon": len(daemons), "server": sum(len(d.servers) for d in daemons),
                    "process": len(pids), "gpu": len(snapshot.gpu.gpus), "engine": len(snapshot.engines.engines),
                    "log dir": len(snapshot.mps_logs.dirs)})


@pytest.fixture(scope="module")
def large_node() -> NodeSnapshot:
    configure_logging("error", "json")  # 48 clients on each GPU: the limit, warned about every cycle
    with node("large", *NODES["large"]) as setup:
        return settled_scheduler(setup).store.current()


def test_every_group_of_series_is_within_its_budget_on_the_large_node(large_node):
    budget, _ = documented_budget()
    have = members(large_node)
    assert (have["gpu"], have["process"], have["engine"]) == (8, 385, 16)  # the node it claims to be: 384 clients, 1 server
    series: Counter[str] = Counter()
    by_family: dict[str, Counter[str]] = {}
    for family in render(large_node, "test"):
        for sample in family.samples:
            group = group_of(family.name, set(sample.labels))
            series[group] += 1
            by_family.setdefault(group, Counter())[family.name] += 1
    assert set(series) <= set(budget), f"groups without a budget in docs/metrics.md: {set(series) - set(budget)}"
    over = {group: (n, budget[group] * have[group], by_family[group].most_common(5))
            for group, n in series.items() if n > budget[group] * have[group]}
    assert not over, f"over budget (series, budget, largest families): {over}"


def test_no_series_has_more_labels_than_stated(large_node):
    _, max_labels = documented_budget()
    widest = max((len(s.labels), f.name) for f in render(large_node, "test") for s in f.samples)
    assert widest[0] <= max_labels, widest
