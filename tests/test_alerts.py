"""The shipped alert rules, runbooks and Alertmanager example, checked with promtool and amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mpswatch.metrics import CATALOG

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "mpswatch.rules.yml"

pytestmark = pytest.mark.skipif(
    not (shutil.which("promtool") and shutil.which("amtool")),
    reason="needs promtool and amtool (Debian packages prometheus, prometheus-alertmanager; the README's test command installs them)",
)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_every_alert_passes_its_unit_tests():
    checked = run("promtool", "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run("promtool", "test", "rules", str(ALERTS / "tests" / "mpswatch.rules.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_unit_test():
    tests = (ALERTS / "tests" / "mpswatch.rules.test.yml").read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    assert fired == {rule["alert"] for rule in rules() if "alert" in rule}


def test_expressions_use_only_documented_metrics_recording_rules_up_and_alerts():
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = set(CATALOG) | recorded | {"up", "ALERTS"}
    for rule in rules():
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # label values are not names
        names = set(re.findall(r"\b(mps[a-z_:]*|mpswatch_[a-z_]+|up|ALERTS)\b", expr))
        assert names <= known, (rule.get("alert") or rule.get("record"), names - known)


def anchors(book: str) -> set[str]:
    return {heading.lower() for heading in re.findall(r"^## (\w+)$", book, re.MULTILINE)}


def test_alerts_follow_the_house_style():
    book = anchors((ALERTS / "runbooks.md").read_text())
    for rule in (r for r in rules() if "alert" in r):
        name = rule["alert"]
        # one casing: MPSWatch* for the agent's own, MPS* for the rest (MPSGPU* for a GPU's)
        assert re.fullmatch(r"MPS(Watch)?[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook_url"] in (f"http://{{{{ $labels.instance }}}}/runbooks#{name.lower()}",
                                                      f"alerts/runbooks.md#{name.lower()}"), name
        assert name.lower() in book, f"{name} has no runbook"
        assert "instance" in rule["annotations"]["summary"], f"{name}'s summary does not name the node"


def test_every_alerts_runbook_is_served_by_the_agent_at_its_runbook_url():
    """The default runbook_url is the alerting node's agent: /runbooks must have each alert's anchor,
    and be the packaged copy of alerts/runbooks.md (`pip install .` ships it)."""
    from mpswatch.exporter import RUNBOOKS_CONTENT_TYPE, respond

    status, content_type, body = respond("/runbooks", None, None, lambda: (True, "ok"))  # type: ignore[arg-type]
    assert (status, content_type) == ("200 OK", RUNBOOKS_CONTENT_TYPE)
    assert body == (ALERTS / "runbooks.md").read_bytes()
    served = anchors(body.decode())
    for rule in (r for r in rules() if "alert" in r):
        assert rule["annotations"]["runbook_url"].rsplit("#", 1)[1] in served, rule["alert"]


def test_the_shipped_rules_and_the_agents_runbooks_are_generated_from_their_sources():
    checked = run(sys.executable, str(ALERTS / "rules.py"), "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def generated(*argv: str) -> list[dict]:
    made = run(sys.executable, str(ALERTS / "rules.py"), *argv)
    assert made.returncode == 0, made.stderr
    return [rule for group in yaml.safe_load(made.stdout)["groups"] for rule in group["rules"]]


def test_the_runbook_base_and_the_job_selector_are_parameters(tmp_path):
    made = generated("--runbook-base", "https://wiki.example.com/mpswatch/runbooks/", "--job-selector", 'job="gpu-nodes"')
    urls = {r["alert"]: r["annotations"]["runbook_url"] for r in made if "alert" in r}
    assert urls["MPSServerFault"] == "https://wiki.example.com/mpswatch/runbooks#mpsserverfault"
    assert urls["MPSWatchAbsent"] == "https://wiki.example.com/mpswatch/runbooks#mpswatchabsent"
    exprs = {r["alert"]: r["expr"] for r in made if "alert" in r}
    assert exprs["MPSWatchTargetDown"] == 'up{job="gpu-nodes"} == 0'
    assert exprs["MPSWatchAbsent"] == 'absent(up{job="gpu-nodes"})'
    assert not any("mpswatch.*" in str(rule) for rule in made)
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": made}]}))
    checked = run("promtool", "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_one_setting_leaves_out_the_alerts_dcgm_exporter_raises_and_their_runbooks_say_so():
    shipped = {r["alert"] for r in rules() if "alert" in r}
    beside_dcgm = {r["alert"] for r in generated("--dcgm-exporter") if "alert" in r}
    assert shipped - beside_dcgm == {"MPSGPUCriticalXid", "MPSGPUMemoryNearlyFull"}
    book = (ALERTS / "runbooks.md").read_text()
    for alert in shipped - beside_dcgm:
        section = book.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
        assert "--dcgm-exporter" in section, alert


def test_alertmanager_example_is_valid_and_routes_critical_to_the_pager():
    config = str(ALERTS / "alertmanager.example.yml")
    checked = run("amtool", "check-config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for labels, receiver in (
        (["severity=critical", "alertname=MPSControlDaemonDown"], "pager"),
        (["severity=critical", "alertname=MPSGPUCriticalXid"], "pager"),
        (["severity=warning", "alertname=MPSEngineCPUBound"], "tickets"),
        (["severity=info", "alertname=Anything"], "tickets"),
    ):
        routed = run("amtool", "config", "routes", "test", f"--config.file={config}", f"--verify.receivers={receiver}", *labels)
        assert routed.returncode == 0, (labels, routed.stdout + routed.stderr)
