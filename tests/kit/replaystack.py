"""A whole node replayed on loopback: the fixture MPS daemon (real H200 replies), a vLLM-like engine
attached to the fake NVML's GPU as an MPS client, the MPS logs, the agent, and Debian's Prometheus
(with the shipped rules) and Alertmanager (the shipped example, its webhooks pointed at `hook_url`).
Used by the end-to-end alert tests and by `make demo` (demo/replay.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import yaml

from tests.kit import fakevllm
from tests.kit.agentproc import REPO, Agent, free_port
from tests.kit.fakedaemon import FAKE_CONTROL, FakeDaemon
from tests.kit.fakevllm import wait_ready

ALERTS = REPO / "alerts"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class ReplayStack:
    """`mps_started=False`: a node where MPS is expected (`--mps-expected true`) and never started; the
    agent discovers daemons (in a default pipe dir of its own, under a /proc of its own, so that
    nothing else on the test machine is found) until start_daemon() puts one there."""

    def __init__(self, work: Path, hook_url: str, interval: str = "1s", agent_interval: str = "0.5",
                 alert_grouping: tuple[str, str] = ("1s", "1s"), mps_started: bool = True) -> None:
        self.work = work
        self.daemon: FakeDaemon | None = FakeDaemon(work / "mps", "healthy_two_clients_driver580") if mps_started else None
        self._processes: list[subprocess.Popen] = []
        self.agent: Agent | None = None
        try:
            self._start(hook_url, interval, agent_interval, alert_grouping)
        except BaseException:
            self.close()
            raise

    def _start(self, hook_url: str, interval: str, agent_interval: str, grouping: tuple[str, str]) -> None:
        work = self.work
        log_dir = work / "log"
        log_dir.mkdir()
        (log_dir / "server.log").write_text((REPO / "tests/fixtures/h200-driver580/session1-server.log").read_text())
        args = ["--mps-control-bin", FAKE_CONTROL, "--interval", agent_interval, "--log-dir", str(log_dir)]
        env = {"MPSWATCH_GPU_INTERVAL_SECONDS": agent_interval, "MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": agent_interval}
        if self.daemon is not None:
            engine = wait_ready(self._spawn(
                fakevllm.command(free_port(), "qwen-a", "--latencies"),
                env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": self.daemon.path}, stdout=subprocess.PIPE, text=True,
            ))
            args += ["--pipe-dir", self.daemon.path]
            env["FAKENVML_MPS_CLIENT_PIDS"] = str(engine.pid)  # the engine is an MPS client of the fake GPU
        else:
            (work / "proc").mkdir()
            args += ["--mps-expected", "true", "--proc-root", str(work / "proc")]
            env.update(MPSWATCH_MPS_CONTROL_DEFAULT_PIPE_DIRS=str(self._default_pipe_dir),
                       MPSWATCH_DEVICE_PLUGIN_ROOT=str(work / "no-device-plugin"))
        self.agent = Agent(args, env=env, log_path=work / "agent.log", nvml="h200")
        am_config = yaml.safe_load((ALERTS / "alertmanager.example.yml").read_text())
        for receiver in am_config["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = hook_url + urllib.parse.urlsplit(hook["url"]).path
        am_config["route"].update(group_wait=grouping[0], group_interval=grouping[1])
        (work / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
        self.alertmanager_port, self.prometheus_port = free_port(), free_port()
        self._spawn([ALERTMANAGER, f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'am'}",
                     f"--web.listen-address=127.0.0.1:{self.alertmanager_port}", "--cluster.listen-address="],
                    stdout=subprocess.DEVNULL, stderr=open(work / "alertmanager.log", "wb"))
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(ALERTS / "mpswatch.rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]},
            "scrape_configs": [{"job_name": "mpswatch", "static_configs": [{"targets": [f"127.0.0.1:{self.agent.port}"]}]}],
        }))
        self._spawn([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.prometheus_port}"],
                    stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"))
        self.prometheus = f"http://127.0.0.1:{self.prometheus_port}"
        self.alertmanager = f"http://127.0.0.1:{self.alertmanager_port}"

    def _spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        process = subprocess.Popen(argv, **kw)
        self._processes.append(process)
        return process

    @property
    def _default_pipe_dir(self) -> Path:
        return self.work / "default" / "healthy_two_clients_driver580" / "pipe"

    def start_daemon(self) -> None:
        """MPS starts at last, in the default pipe dir the agent looks at."""
        self.daemon = FakeDaemon(self.work / "default", "healthy_two_clients_driver580", process=False)
        assert self.daemon.pipe_dir == self._default_pipe_dir

    def kill_daemon(self) -> None:
        """As `kill -9`: the control program then says no daemon runs, and the pid file stays."""
        self.daemon.kill()
        self.daemon.update(mode="not_running")

    def restore_daemon(self) -> None:
        self.daemon.update(mode="answer")

    def close(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.agent is not None:
            self.agent.stop()
        if self.daemon is not None:
            self.daemon.close()
