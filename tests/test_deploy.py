"""Install files, checked without a container engine: the Dockerfile (hadolint, and its install steps
run for real in a fresh virtualenv), systemd units, Kubernetes manifests, the reference Compose
deployment, its nginx, Prometheus, Alertmanager and Grafana files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mpswatch.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)


def needs(tool: str):
    return pytest.mark.skipif(not (shutil.which(tool) or (BIN / tool).exists()), reason=f"needs {tool}")


@needs("hadolint")
def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or BIN / "hadolint"
    checked = run(hadolint, ROOT / "Dockerfile")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_install_steps_work_in_a_fresh_virtualenv(tmp_path):
    """The build stage's COPY and RUN lines, replayed here with /opt/mpswatch moved to a temp dir."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    build_stage = dockerfile.split("\nFROM ", 2)[1]
    context = tmp_path / "src"
    context.mkdir()
    for sources, _ in re.findall(r"^COPY (?!--from)(.+) (\S+)$", build_stage, re.MULTILINE):
        for source in sources.split():
            target = context / source
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy(ROOT / source, target)
    [install] = re.findall(r"^RUN (.+)$", build_stage, re.MULTILINE)
    prefix = tmp_path / "opt" / "mpswatch"
    built = run("sh", "-c", install.replace("/opt/mpswatch", str(prefix)).replace("python ", f"{sys.executable} ", 1),
                cwd=context)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    version = run(prefix / "bin" / "mpswatch", "--version")
    assert version.returncode == 0 and version.stdout.startswith("mpswatch, version")
    assert 'ENTRYPOINT ["/opt/mpswatch/bin/mpswatch", "run"]' in dockerfile
    assert re.search(r"^USER 10101:10101$", dockerfile, re.MULTILINE)


@needs("systemd-analyze")
def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify in a root made for it: the units' programs as stubs, systemd's own units."""
    root = tmp_path / "root"
    for program in ("usr/bin/nvidia-cuda-mps-control", "usr/bin/nvidia-smi", "opt/mpswatch/bin/mpswatch",
                    "opt/vllm/bin/vllm", "bin/sh"):
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_text("#!/bin/sh\n")
        (root / program).chmod(0o755)
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in DEPLOY.glob("systemd/*.service"):
        shutil.copy(unit, units)
    verified = run("systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/nvidia-mps.service",
                   "/etc/systemd/system/mpswatch.service", "/etc/systemd/system/vllm@engine-a.service")
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stdout + verified.stderr
    assert "CUDA_MPS_PIPE_DIRECTORY=/run/nvidia-mps" in (units / "vllm@.service").read_text()


@pytest.mark.parametrize("path", ["systemd/config.toml", "reference/mpswatch.toml"])
def test_shipped_agent_configs_load(path):
    config = load_config(str(DEPLOY / path), env={})
    assert config.mps_control.pipe_dirs == ("/run/nvidia-mps",)


def test_the_kubernetes_configmap_holds_a_valid_config(tmp_path):
    configmap = yaml.safe_load((DEPLOY / "kubernetes/configmap.yaml").read_text())
    (tmp_path / "config.toml").write_text(configmap["data"]["config.toml"])
    config = load_config(str(tmp_path / "config.toml"), env={})
    assert config.device_plugin_root == "/run/nvidia/mps"


@needs("kubernetes-validate")
def test_kubernetes_manifests_match_their_schemas():
    tool = shutil.which("kubernetes-validate") or BIN / "kubernetes-validate"
    manifests = [DEPLOY / "kubernetes" / name for name in ("daemonset.yaml", "configmap.yaml", "service.yaml")]
    checked = run(tool, "--strict", "-k", "1.30.0", *manifests)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    kustomization = yaml.safe_load((DEPLOY / "kubernetes/kustomization.yaml").read_text())
    assert all((DEPLOY / "kubernetes" / r).exists() for r in kustomization["resources"])


def test_the_daemonset_keeps_to_its_security_promises():
    spec = yaml.safe_load((DEPLOY / "kubernetes/daemonset.yaml").read_text())["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert all(m["readOnly"] for m in container["volumeMounts"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_the_prometheusrule_is_generated_from_the_shipped_rules():
    checked = run(sys.executable, DEPLOY / "kubernetes/generate_prometheusrule.py", "--check")
    assert checked.returncode == 0, "deploy/kubernetes/prometheusrule.yaml is stale: run its generator"
    rule = yaml.safe_load((DEPLOY / "kubernetes/prometheusrule.yaml").read_text())
    assert rule["spec"] == yaml.safe_load((ROOT / "alerts/mpswatch.rules.yml").read_text())


@needs("docker-compose")
def test_the_reference_compose_file_is_valid():
    checked = run("docker-compose", "-f", DEPLOY / "reference/compose.yaml", "config", "-q")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = yaml.safe_load((DEPLOY / "reference/compose.yaml").read_text())
    assert {"mps", "engine-a", "engine-b", "router", "mpswatch", "prometheus", "alertmanager", "grafana"} <= set(compose["services"])


@needs("nginx")
def test_the_router_config_passes_nginx_t(tmp_path):
    conf = (DEPLOY / "reference/nginx/nginx.conf").read_text().replace("events {}", f"events {{}}\npid {tmp_path}/nginx.pid;")
    (tmp_path / "nginx.conf").write_text(conf)
    checked = run(shutil.which("nginx"), "-t", "-c", tmp_path / "nginx.conf", "-p", tmp_path, "-e", "stderr")
    assert checked.returncode == 0, checked.stderr
    assert "least_conn" in conf


@needs("promtool")
def test_the_reference_prometheus_config_is_valid(tmp_path):
    config = yaml.safe_load((DEPLOY / "reference/prometheus/prometheus.yml").read_text())
    config["rule_files"] = [str(ROOT / "alerts/mpswatch.rules.yml")]  # mounted there by compose.yaml
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = run("promtool", "check", "config", tmp_path / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_provisioning_points_at_the_shipped_dashboards():
    compose = yaml.safe_load((DEPLOY / "reference/compose.yaml").read_text())
    mounts = dict(volume.rsplit(":", 2)[:2] if volume.count(":") == 2 else volume.split(":", 1)
                  for volume in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "reference/grafana/provisioning/dashboards/mpswatch.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    source = next(src for src, dst in mounts.items() if dst == path)
    assert sorted(p.name for p in (DEPLOY / "reference" / source).resolve().glob("*.json")) == [
        "engines.json", "gpus.json", "node-overview.json"]
    datasource = yaml.safe_load((DEPLOY / "reference/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_pyproject_is_what_the_dockerfile_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "mpswatch" and project["scripts"]["mpswatch"] == "mpswatch.cli:main"
