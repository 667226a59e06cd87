"""Writes prometheusrule.yaml from alerts/mpswatch.rules.yml, so the cluster gets the same rules.

    python deploy/kubernetes/generate_prometheusrule.py [--check]
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent.parent / "alerts" / "mpswatch.rules.yml"


def render() -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "mpswatch", "labels": {"app.kubernetes.io/name": "mpswatch"}},
        "spec": yaml.safe_load(RULES.read_text()),
    }
    header = "# Generated from alerts/mpswatch.rules.yml by generate_prometheusrule.py: edit the rules there.\n"
    return header + yaml.safe_dump(rule, sort_keys=False, width=200)


if __name__ == "__main__":
    target = HERE / "prometheusrule.yaml"
    if "--check" in sys.argv:
        sys.exit(0 if target.exists() and target.read_text() == render() else 1)
    target.write_text(render())
