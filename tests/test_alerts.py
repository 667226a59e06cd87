"""The shipped alert rules, runbooks and Alertmanager example, checked with promtool and amtool."""

from __future__ import annotations

import re
import shutil
import subprocess
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


def test_alerts_follow_the_house_style():
    book = (ALERTS / "runbooks.md").read_text()
    anchors = {heading.lower() for heading in re.findall(r"^## (\w+)$", book, re.MULTILINE)}
    for rule in (r for r in rules() if "alert" in r):
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook_url"] == f"alerts/runbooks.md#{name.lower()}"
        assert name.lower() in anchors, f"{name} has no runbook"
        assert "instance" in rule["annotations"]["summary"], f"{name}'s summary does not name the node"


def test_alertmanager_example_is_valid_and_routes_critical_to_the_pager():
    config = str(ALERTS / "alertmanager.example.yml")
    checked = run("amtool", "check-config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for labels, receiver in (
        (["severity=critical", "alertname=MPSControlDaemonDown"], "pager"),
        (["severity=critical", "alertname=GPUCriticalXid"], "pager"),
        (["severity=warning", "alertname=MPSEngineCPUBound"], "tickets"),
        (["severity=info", "alertname=Anything"], "tickets"),
    ):
        routed = run("amtool", "config", "routes", "test", f"--config.file={config}", f"--verify.receivers={receiver}", *labels)
        assert routed.returncode == 0, (labels, routed.stdout + routed.stderr)
