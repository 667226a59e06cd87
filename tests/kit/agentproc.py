"""Runs agents under test as real processes, through the kit's launcher (tests/kit/agent.py):
`mpswatch run` on a loopback port, scraped over HTTP (Agent), and one-shot commands (mpswatch_cmd)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without MPSWATCH_ settings, plus `extra`; the launcher and this checkout's
    agent importable (a second clone of the repository runs its own agent, not the one installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "agent"), str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpswatch_cmd(*args: str, nvml: str | None = None) -> list[str]:
    """`mpswatch ARGS` as an agent under test: through the launcher, which keeps it to this session's
    processes and directories. `nvml`: a fake of tests.kit.fakenvml by its factory's name (h200, ...);
    None: nvidia-ml-py."""
    return [sys.executable, "-m", "tests.kit.agent", *(["--nvml", nvml] if nvml else []), *args]


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    """A series' key in parse_exposition's result."""
    return (name, frozenset(labels.items()))


def gpu_uuid(samples: dict[tuple[str, frozenset], float], index: int = 0) -> str | None:
    """The UUID of the GPU with this NVML index: the index is on mps_gpu_info only."""
    return next((dict(labels)["gpu_uuid"] for name, labels in samples
                 if name == "mps_gpu_info" and dict(labels)["gpu"] == str(index)), None)


def parse_exposition(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


class Agent:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None,
                 nvml: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            mpswatch_cmd("run", "--listen", f"127.0.0.1:{self.port}", "--log-format", "json", *args, nvml=nvml),
            env=agent_env(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_healthy()

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}")
            try:
                if self.get("/healthz", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("agent did not become healthy")

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_exposition(body)

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, frozenset(labels.items())))

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.1):
        """Polls scrapes until predicate(samples) is truthy; returns that value or raises."""
        deadline = time.monotonic() + timeout
        samples = {}
        while time.monotonic() < deadline:
            samples = self.scrape()
            result = predicate(samples)
            if result:
                return result
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout} s; last scrape: {sorted(samples.items())[:60]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
