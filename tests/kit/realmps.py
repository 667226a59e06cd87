"""A real MPS control daemon on the GPU machine, in a directory of its own, and its CUDA clients
(cuda_client.py): for the GPU tests (tests/gpu) and the GPU benchmarks. The daemon, its servers and
clients inherit the session's scope (tests.kit.scope), so the agents under test see them.
GPU settings are never touched."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
