"""Install files, checked without a container engine: the Dockerfile (hadolint, and its install steps
run for real in a fresh virtualenv), systemd units, Kubernetes manifests, the reference Compose
deployment, its nginx, Prometheus, Alertmanager and Grafana files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from mpswatch.config import BY_KEY, DEFAULT_PORT, load_config
from mpswatch.metrics import CATALOG

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
                    "opt/vllm/bin/vllm", "bin/sh", "bin/kill"):
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


K8S = DEPLOY / "kubernetes"


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def agent_pod() -> dict:
    return manifest("daemonset.yaml")["spec"]["template"]


def host_path_at(pod_spec: dict, path: str) -> tuple[str, bool] | None:
    """The host path that the agent's container sees at `path` through a hostPath volume (the
    deepest mount holding it), and whether that mount is read-only; None when no hostPath holds it."""
    mounts = [m for m in pod_spec["containers"][0]["volumeMounts"]
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    if "hostPath" not in volume:
        return None
    return volume["hostPath"]["path"] + path[len(mount["mountPath"]):], mount.get("readOnly", False)


def dirs_looked_in(pipe_dirs, default_pipe_dirs, log_dirs, default_log_dir, device_plugin_root, socket) -> set[str]:
    return {*pipe_dirs, *default_pipe_dirs, *log_dirs, default_log_dir, device_plugin_root, os.path.dirname(socket)}


def test_the_daemonset_mounts_every_dir_the_agent_looks_in(tmp_path):
    """MPS's pipe and log dirs, the device plugin's root and the kubelet's socket dir, as the
    settings' defaults and the shipped config name them: each mounted read-only from the same path
    on the host, so a default that changes without the manifest fails here."""
    defaults = {key: setting.default for key, setting in BY_KEY.items()}
    by_default = dirs_looked_in(defaults["mps_control.pipe_dirs"], defaults["mps_control.default_pipe_dirs"],
                                defaults["mps_logs.log_dirs"], defaults["mps_logs.default_log_dir"],
                                defaults["device_plugin_root"], defaults["pods.pod_resources_socket"])
    (tmp_path / "config.toml").write_text(manifest("configmap.yaml")["data"]["config.toml"])
    config = load_config(str(tmp_path / "config.toml"), env={})
    configured = dirs_looked_in(config.mps_control.pipe_dirs, config.mps_control.default_pipe_dirs,
                                config.mps_logs.log_dirs, config.mps_logs.default_log_dir,
                                config.device_plugin_root, config.pods.pod_resources_socket)
    assert {"/tmp/nvidia-mps", "/run/nvidia-mps", "/var/log/nvidia-mps", "/run/nvidia/mps",
            "/var/lib/kubelet/pod-resources"} <= by_default
    spec = agent_pod()["spec"]
    assert {d: host_path_at(spec, d) for d in by_default | configured} == {d: (d, True) for d in by_default | configured}
    # /proc is the container's own, which hostPID makes the host's process table
    assert config.proc_root == defaults["proc_root"] == "/proc" and spec["hostPID"] is True


def documented_capabilities() -> set[str]:
    """The capabilities named in the "needs" column of deploy/README.md's privileges table."""
    section = (DEPLOY / "README.md").read_text().split("### Privileges", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("|")]
    return {cap for row in rows if len(row) > 3 for cap in re.findall(r"CAP_[A-Z_]+", row[2])}


def test_the_daemonset_keeps_to_its_security_promises():
    spec = agent_pod()["spec"]
    [container] = spec["containers"]
    context = container["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    added = {f"CAP_{cap}" for cap in context["capabilities"]["add"]}
    assert "CAP_SYS_ADMIN" not in added
    assert added == documented_capabilities() == {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert spec["securityContext"]["runAsUser"] == 0  # the kubelet's socket; added capabilities work for root only
    assert spec["hostPID"] is True and spec["hostNetwork"] is False and not spec.get("hostIPC")
    assert spec["automountServiceAccountToken"] is False
    assert all(m["readOnly"] for m in container["volumeMounts"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"] and container["resources"]["requests"]


PROC_READS = """
import json, os, sys
from mpswatch.procfs import ProcFS

procfs = ProcFS()
def readable(pid):
    try:
        environ = procfs.environ(pid) is not None
    except PermissionError:
        environ = False
    try:
        root = bool(os.listdir(f"/proc/{pid}/root/"))
    except OSError:
        root = False
    return {"environ": environ, "fd": bool(procfs.socket_inodes(pid)),
            "ns/net": procfs.link(f"{pid}/ns/net") is not None, "root": root}
print(json.dumps({who: readable(int(pid)) for who, pid in zip(("root", "other uid"), sys.argv[1:])}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_the_daemonsets_capabilities_are_what_reading_other_processes_takes():
    """What the agent reads of other processes (environment, socket fds, network namespace, root), as
    uid 0 with the DaemonSet's capabilities only: a process of root's with all capabilities (a host
    daemon) and one of another uid (an engine pod's user) are both readable, and each capability is
    needed: without it one of those reads fails."""
    added = [cap.lower() for cap in agent_pod()["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]]
    python = os.path.join(sys.base_prefix, "bin", "python3")
    holder = [python, "-c", "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                            "print('listening', flush=True); time.sleep(60)"]
    targets = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
               for argv in (holder, ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", *holder])]
    try:
        assert [t.stdout.readline() for t in targets] == ["listening\n"] * 2

        def reads(caps: list[str]) -> dict:
            bounding = ",".join(["-all", *(f"+{cap}" for cap in caps)])
            done = run("setpriv", "--bounding-set", bounding, "--inh-caps", "-all", "--", sys.executable, "-c", PROC_READS,
                       *(t.pid for t in targets))
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        everything = {"environ": True, "fd": True, "ns/net": True, "root": True}
        assert reads(added) == {"root": everything, "other uid": everything}
        for cap in added:
            without = reads([c for c in added if c != cap])
            assert not all(all(r.values()) for r in without.values()), f"{cap} is not needed"
        assert not any(r["environ"] for r in reads([]).values())
    finally:
        for target in targets:
            target.kill()
            target.wait()


def test_the_monitors_scrape_the_agents_pods_and_keep_their_pod_labels():
    pod = agent_pod()
    labels = pod["metadata"]["labels"]
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    service = manifest("service.yaml")
    rules = yaml.safe_load((ROOT / "alerts/mpswatch.rules.yml").read_text())
    [target_down] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "MPSWatchTargetDown"]
    [job_pattern] = re.findall(r'up\{job=~"([^"]+)"\}', target_down)
    monitors = {"servicemonitor.yaml": ("ServiceMonitor", "endpoints"), "podmonitor.yaml": ("PodMonitor", "podMetricsEndpoints")}
    for name, (kind, endpoints) in monitors.items():
        monitor = manifest(name)
        assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", kind)
        [endpoint] = monitor["spec"][endpoints]
        assert endpoint["honorLabels"] is True
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "instance"} in endpoint["relabelings"]
        if kind == "PodMonitor":
            assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
            assert endpoint["port"] in ports
            job = labels[monitor["spec"]["jobLabel"]]
        else:
            assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            assert service["spec"]["selector"].items() <= labels.items()
            [service_port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            assert service_port["targetPort"] in ports
            job = service["metadata"]["name"]
        assert re.fullmatch(job_pattern, job), f"{name}: job {job} is not what MPSWatchTargetDown watches"
    resources = manifest("kustomization.yaml")["resources"]
    assert len(set(monitors) & set(resources)) == 1, "one monitor, or every agent is scraped twice"


def test_the_agent_exports_no_label_a_scrape_target_sets_but_the_pods_own():
    """honorLabels keeps the pod info series' namespace, pod and container; any other label the target
    sets (job, instance, ...) exported by the agent would silently override the target's."""
    target_labels = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
    clashes = {spec.name: set(spec.labels) & target_labels for spec in CATALOG.values() if set(spec.labels) & target_labels}
    assert clashes == {"mps_pod_info": {"namespace", "pod", "container"},
                       "mps_engine_pod_info": {"namespace", "pod", "container"}}


def test_the_prometheusrule_is_generated_from_the_shipped_rules():
    checked = run(sys.executable, DEPLOY / "kubernetes/generate_prometheusrule.py", "--check")
    assert checked.returncode == 0, "deploy/kubernetes/prometheusrule.yaml is stale: run its generator"
    rule = yaml.safe_load((DEPLOY / "kubernetes/prometheusrule.yaml").read_text())
    assert rule["spec"] == yaml.safe_load((ROOT / "alerts/mpswatch.rules.yml").read_text())


def test_a_prometheusrule_with_the_runbooks_where_the_cluster_publishes_them():
    """On Kubernetes `instance` is the node's name and the agent is not on the host's network: the
    default runbook link (the node's agent) does not resolve, so the generator takes a base."""
    made = run(sys.executable, DEPLOY / "kubernetes/generate_prometheusrule.py", "--runbook-base",
               "https://wiki.example.com/mpswatch/runbooks", "--dcgm-exporter")
    assert made.returncode == 0, made.stderr
    alerts = [r for g in yaml.safe_load(made.stdout)["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(r["annotations"]["runbook_url"] == f"https://wiki.example.com/mpswatch/runbooks#{r['alert'].lower()}"
                          for r in alerts)
    assert "MPSGPUCriticalXid" not in {r["alert"] for r in alerts}


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
        "engines.json", "fleet.json", "gpus.json", "node-overview.json"]
    datasource = yaml.safe_load((DEPLOY / "reference/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_pyproject_is_what_the_dockerfile_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "mpswatch" and project["scripts"]["mpswatch"] == "mpswatch.cli:main"


# Health checks and hardening (issue 17: a metrics endpoint fit for production)


def dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_the_images_base_is_pinned_by_digest():
    """A tag moves under a rebuild; a digest does not. Both stages the same image, so the build
    stage's virtualenv finds its interpreter at the same path in the final one."""
    bases = [args.split()[0] for args in dockerfile_instructions("FROM")]
    assert len(bases) == 2 and len(set(bases)) == 1, bases
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", bases[0]), bases[0]


def healthcheck_command() -> list[str]:
    [healthcheck] = dockerfile_instructions("HEALTHCHECK")
    return json.loads(healthcheck.split(" CMD ", 1)[1])


class _Status503(threading.Thread):
    """A loopback HTTP server that answers every GET 503, as an agent whose loops died does."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(503)
                self.end_headers()
                self.wfile.write(b"unhealthy: collection loop gpu has exited\n")

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def run(self) -> None:
        self.server.serve_forever()


def test_the_images_healthcheck_asks_healthz_and_fails_when_the_agent_is_unhealthy():
    """The HEALTHCHECK command itself, run here with this interpreter against a live agent (0), an
    unhealthy one (503: not 0) and nothing listening (not 0); at the port the image exposes, or the
    one MPSWATCH_LISTEN gives the agent."""
    from tests.kit.agentproc import Agent
    from tests.kit.fakedaemon import FAKE_CONTROL

    command = healthcheck_command()
    assert command[0] == "/opt/mpswatch/bin/python" and "/healthz" in command[-1]
    [exposed] = dockerfile_instructions("EXPOSE")
    assert f"'MPSWATCH_LISTEN', ':{exposed}'" in command[-1] and int(exposed) == DEFAULT_PORT

    def check(port: int) -> int:
        return run(sys.executable, *command[1:], env={**os.environ, "MPSWATCH_LISTEN": f"0.0.0.0:{port}"}).returncode

    with Agent(["--mps-control-bin", FAKE_CONTROL], nvml="no_driver") as agent:
        assert check(agent.port) == 0
    assert check(agent.port) != 0  # stopped: nothing listens
    unhealthy = _Status503()
    unhealthy.start()
    try:
        assert check(unhealthy.port) != 0
    finally:
        unhealthy.server.shutdown()


def test_the_daemonset_probes_healthz_over_plain_http_on_the_metrics_port():
    [container] = agent_pod()["spec"]["containers"]
    [port] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == DEFAULT_PORT
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get.get("scheme", "HTTP")) == ("/healthz", "metrics", "HTTP"), probe
        assert container[probe]["timeoutSeconds"] >= 2, f"{probe}: one slow answer on a busy node must not fail it"


def unit_directives(name: str) -> dict[str, list[str]]:
    """A unit file's [Service] and [Unit] directives, each with every value it is given."""
    directives: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "DevicePolicy": "closed", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
    "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "SystemCallArchitectures": "native", "SystemCallErrorNumber": "EPERM",
}
UNITS = ("mpswatch.service", "nvidia-mps.service", "vllm@.service")


@pytest.mark.parametrize("unit", UNITS)
def test_every_shipped_unit_is_hardened_with_gpus_allowed_by_class(unit):
    """The agent's baseline on all three, GPU device nodes by class (any number of GPUs), and what each
    program needs kept: MPS its dirs and readable logs, vLLM its network and caches."""
    d = unit_directives(unit)
    assert {key: d.get(key, [None])[-1] for key in HARDENING} == HARDENING
    assert "@system-service" in d["SystemCallFilter"] and "CapabilityBoundingSet" in d
    assert "RestrictAddressFamilies" in d
    allowed = [value.split()[0] for value in d["DeviceAllow"]]
    assert all(re.fullmatch(r"char-nvidia[a-z-]*", device) for device in allowed), allowed
    assert {"char-nvidia-frontend", "char-nvidia"} <= set(allowed)  # major 195, by its old name and its new
    assert d["PrivateDevices"] == ["no"]
    if unit == "nvidia-mps.service":
        assert {"char-nvidia-uvm", "char-nvidia-caps"} <= set(allowed)
        assert d["RuntimeDirectory"] == ["nvidia-mps"] and d["LogsDirectory"] == ["nvidia-mps"]
        assert d["UMask"] == ["0022"]  # the logs stay readable to the agent's user
        assert {"CAP_SETUID", "CAP_SETGID"} <= set(d["CapabilityBoundingSet"][0].split())
        assert "CAP_SYS_ADMIN" not in d["CapabilityBoundingSet"][0]
        assert "PrivateIPC" not in d and "PrivateNetwork" not in d  # clients share memory and the pipe dir's sockets
    if unit == "vllm@.service":
        assert "char-nvidia-uvm" in allowed
        assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(d["RestrictAddressFamilies"][0].split())
        assert d["CapabilityBoundingSet"] == [""] and d["User"] == ["vllm"]
        assert "RemoveIPC" not in d and "PrivateIPC" not in d  # instances share the user vllm and /dev/shm
        environment = " ".join(d["Environment"])
        assert "HF_HOME=/var/lib/vllm/" in environment and "HOME=/var/lib/vllm" in environment
        assert "CUDA_MPS_PIPE_DIRECTORY=/run/nvidia-mps" in environment
    if unit == "mpswatch.service":
        assert (d["Type"], d["NotifyAccess"]) == (["notify"], ["main"]) and d["WatchdogSec"]


EXPOSURE_AT_MOST = 3.0  # the agent's unit was 2.4 when the MPS and vLLM examples were 9.6 and 8.8


def exposure(unit: str) -> float | None:
    checked = run("systemd-analyze", "security", "--offline=true", "--no-pager", unit, cwd=DEPLOY / "systemd")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", checked.stdout)
    return float(found.group(1)) if found else None


@pytest.mark.parametrize("unit", UNITS)
def test_every_shipped_units_exposure_is_low(unit):
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze")
    score = exposure(unit)
    if score is None:
        pytest.skip("this systemd-analyze cannot score unit files offline (--offline= came with systemd 250)")
    assert score <= EXPOSURE_AT_MOST, f"{unit}: exposure {score} (systemd-analyze security --offline=true)"
