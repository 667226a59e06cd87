"""Real MPS on a real GPU: each test starts its own control daemon in a temporary directory
and always stops it, its servers and its clients. GPU settings are never touched."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.matrix import Matrix

HERE = Path(__file__).resolve().parent
# the fault matrix: every GPU test adds its rows; written to $MPSWATCH_GPU_MATRIX_RESULTS at the end
MATRIX = Matrix()


def _gpu_present() -> bool:
    if not shutil.which("nvidia-cuda-mps-control") or not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with nvidia-cuda-mps-control")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


class MpsDaemon:
    def __init__(self, root: Path) -> None:
        self.pipe_dir = root / "pipe"
        self.log_dir = root / "log"
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }
        self.clients: list[subprocess.Popen] = []

    @property
    def pid_file(self) -> Path:
        return self.pipe_dir / "nvidia-cuda-mps-control.pid"

    def start(self) -> int:
        """Starts the daemon and returns its pid, once its pid file names a running process (a
        killed daemon's stale file names a dead one)."""
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = self.pid_file.read_text().strip() if self.pid_file.exists() else ""
            if text.isdigit() and Path(f"/proc/{text}").exists():
                return int(text)
            time.sleep(0.05)
        raise RuntimeError("MPS control daemon wrote no pid file")

    def control(self, command: str, timeout: float = 10) -> subprocess.CompletedProcess:
        """The test's own channel to its own daemon (the agent never sends anything but reads)."""
        return subprocess.run(
            ["nvidia-cuda-mps-control"], input=command + "\n", env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def start_client(self, size: int = 2048, kind: str = "matmul", dtype: str = "float32",
                     without_mps: bool = False) -> subprocess.Popen:
        """A PyTorch client; `without_mps` starts it without the pipe dir, so it runs alone."""
        stop_file = self.pipe_dir.parent / f"stop-{time.monotonic_ns()}"  # never one already touched
        env = {k: v for k, v in self.env.items() if not (without_mps and k == "CUDA_MPS_PIPE_DIRECTORY")}
        client = subprocess.Popen(
            [sys.executable, str(HERE / "cuda_client.py"), str(size), str(stop_file), kind, dtype],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        client.stop_file = stop_file  # type: ignore[attr-defined]
        line = client.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"CUDA client failed to start: {line}{client.stdout.read()}")
        self.clients.append(client)
        return client

    def stop_clients(self) -> None:
        for client in self.clients:
            Path(client.stop_file).touch()
        for client in self.clients:
            try:
                client.wait(timeout=30)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        self.clients.clear()

    def our_processes(self) -> list[int]:
        """Daemon and servers started with our pipe dir (found by their environment)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if "nvidia-cuda-mps" in cmd and f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode() in environ:
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        for pid in self.our_processes():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stop_clients()
        try:
            self.control("quit", timeout=20)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while self.our_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.our_processes():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mps(tmp_path):
    daemon = MpsDaemon(tmp_path / "mps")
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def mps_client(tmp_path_factory):
    """tests/gpu/mps_client.cu, built with nvcc: a light client to start by the dozen, or to fault."""
    binary = tmp_path_factory.mktemp("bin") / "mps_client"
    subprocess.run(["nvcc", "-O2", "-o", str(binary), str(HERE / "mps_client.cu")], check=True, timeout=300)
    return str(binary)


def read_line(process: subprocess.Popen, timeout: float = 30.0) -> str:
    """A client's next line, or "" after `timeout` (a client stuck in CUDA must not hang the run)."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline().strip() if ready else ""


def rest_of_output(process: subprocess.Popen, timeout: float = 60.0) -> str:
    """What a client prints until it exits; killed after `timeout`."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        out = (out or "") + " (killed: still running after the timeout)"
    return (out or "").strip()


@pytest.fixture(autouse=True)
def _save_matrix():
    """After every test, so that a run killed from outside keeps the rows so far."""
    yield
    path = os.environ.get("MPSWATCH_GPU_MATRIX_RESULTS")
    if path and MATRIX.cases:
        gpu = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        MATRIX.save(path, {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "command": "python3 -m pytest -v tests/gpu"})


def results_saver(variable: str, results: dict):
    """A module fixture writing `results` as JSON to $variable at the end, even after a failed
    assertion, to see how far the run got (docs/validation.md quotes these files)."""

    @pytest.fixture(autouse=True, scope="module")
    def _save_results():
        yield
        path = os.environ.get(variable)
        if path:
            with open(path, "w") as handle:
                json.dump(results, handle, indent=2, sort_keys=True, default=str)

    return _save_results
