"""Writes prometheusrule.yaml from alerts/mpswatch.rules.yml, so the cluster gets the same rules.

    python deploy/kubernetes/generate_prometheusrule.py [--check]
    python deploy/kubernetes/generate_prometheusrule.py --runbook-base URL [--job-selector M] [--dcgm-exporter] > mine.yaml

On Kubernetes the alerts' `instance` is the node's name (podmonitor.yaml, servicemonitor.yaml) and the
agent listens on its pod's IP, so the rules' default runbook link (the alerting node's agent) does not
resolve there: give `--runbook-base` where your runbooks are published (alerts/runbooks.md); the other
options are alerts/rules.py's.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent.parent / "alerts" / "mpswatch.rules.yml"


def _rules_generator():
    spec = importlib.util.spec_from_file_location("mpswatch_rules", HERE.parent.parent / "alerts" / "rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(rules_text: str | None = None) -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "mpswatch", "labels": {"app.kubernetes.io/name": "mpswatch"}},
        "spec": yaml.safe_load(rules_text if rules_text is not None else RULES.read_text()),
    }
    header = "# Generated from alerts/mpswatch.rules.yml by generate_prometheusrule.py: edit the rules there.\n"
    return header + yaml.safe_dump(rule, sort_keys=False, width=200)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if prometheusrule.yaml is out of date")
    parser.add_argument("--runbook-base", help="where the runbooks are published (default: the shipped rules')")
    parser.add_argument("--job-selector", help='matchers of the agents\' targets in `up` (default: job=~"mpswatch.*")')
    parser.add_argument("--dcgm-exporter", action="store_true", help="leave out the alerts dcgm-exporter raises")
    args = parser.parse_args()
    target = HERE / "prometheusrule.yaml"
    if args.check:
        sys.exit(0 if target.exists() and target.read_text() == render() else 1)
    if args.runbook_base or args.job_selector or args.dcgm_exporter:
        generator = _rules_generator()
        text = generator.render(args.runbook_base or generator.DEFAULT_RUNBOOK_BASE,
                                args.job_selector or generator.DEFAULT_JOB_SELECTOR, args.dcgm_exporter)
        sys.stdout.write(render(text))
    else:
        target.write_text(render())
