"""The generated dashboards: up to date with their code, every panel described and in units, every
query on documented metrics (or the shipped recording rules) and valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mpswatch.metrics import CATALOG

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RECORDED = {rule["record"] for rules in ("mpswatch.rules.yml", "mpswatch-fleet.rules.yml")
            for group in yaml.safe_load((ROOT / "alerts" / rules).read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def panels():
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                yield path.name, panel


def queries():
    """Every query as Prometheus would run it, with the dashboards' variables filled in."""
    for name, panel in panels():
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            # a variable starts with a letter: `$1` is label_replace's group, left to Prometheus (as Grafana does)
            yield name, panel["title"], re.sub(r"\$[A-Za-z_]\w*", ".*", expr)


def test_the_committed_json_is_what_the_code_generates():
    run = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in DASHBOARDS} == {"node-overview.json", "gpus.json", "engines.json", "fleet.json"}


def test_every_panel_has_a_unit_a_description_and_queries():
    for name, panel in panels():
        assert panel.get("description"), (name, panel["title"])
        assert panel["fieldConfig"]["defaults"].get("unit"), (name, panel["title"])
        assert panel.get("targets"), (name, panel["title"])


def test_dashboards_have_the_datasource_job_and_node_or_cluster_variables_and_a_runbook_link():
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        names = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "job", "cluster" if path.name == "fleet.json" else "instance"} <= names, path.name
        if path.name == "fleet.json":  # no one node: each row links its node's runbooks
            tables = [p for p in dashboard["panels"] if p["type"] == "table"]
            assert all(any(link["url"] == "http://${__data.fields.instance}/runbooks"
                           for link in p["fieldConfig"]["defaults"]["links"]) for p in tables)
        else:  # the alerts' default runbook base: the node's agent
            assert any(link.get("url") == "http://${instance}/runbooks" for link in dashboard["links"]), path.name
    engines = json.loads((ROOT / "dashboards" / "engines.json").read_text())
    assert "engine" in {v["name"] for v in engines["templating"]["list"]}


def test_every_legend_of_node_series_names_the_node():
    for name, panel in panels():
        if name == "fleet.json" or panel["type"] != "timeseries":
            continue
        for target in panel["targets"]:
            assert "{{instance}}" in target["legendFormat"], (name, panel["title"], target["expr"])


def test_a_panel_joins_dcgm_exporters_uuid_to_our_gpu_uuid():
    joined = [expr for name, _, expr in queries() if "DCGM_FI_DEV_GPU_UTIL" in expr]
    assert joined and all('label_replace(DCGM_FI_DEV_GPU_UTIL, "gpu_uuid", "$1", "UUID", "(.+)")' in e for e in joined)
    gpu = json.loads((ROOT / "dashboards" / "gpus.json").read_text())
    assert "gpu" in {v["name"] for v in gpu["templating"]["list"]}
    assert any(p.get("repeat") == "gpu" for p in gpu["panels"] if p["type"] == "row")


def test_queries_use_only_documented_metrics_and_recording_rules():
    known = set(CATALOG) | RECORDED
    for name, title, expr in queries():
        stripped = re.sub(r'"[^"]*"', '""', expr)
        used = set(re.findall(r"\b((?:instance:|cluster:)?(?:mps[a-z0-9_:]*|mpswatch_[a-z0-9_:]+))", stripped))
        assert used and used <= known, (name, title, used - known)


@pytest.mark.skipif(not shutil.which("promtool"), reason="needs promtool (Debian package prometheus)")
def test_queries_parse_as_promql(tmp_path):
    records = [{"record": f"panel:query:{i}", "expr": expr} for i, (_, _, expr) in enumerate(queries())]
    rule_file = tmp_path / "queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": records}]}))
    run = subprocess.run(["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_fleet_tables_link_each_row_to_its_node_overview():
    fleet = json.loads((ROOT / "dashboards" / "fleet.json").read_text())
    tables = [p for p in fleet["panels"] if p["type"] == "table"]
    assert tables and all("var-instance=${__data.fields.instance}" in p["fieldConfig"]["defaults"]["links"][0]["url"]
                          for p in tables)
    node = json.loads((ROOT / "dashboards" / "node-overview.json").read_text())
    assert node["uid"] in tables[0]["fieldConfig"]["defaults"]["links"][0]["url"]
