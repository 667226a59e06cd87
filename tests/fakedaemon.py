"""A pipe dir answered by tests/fakebin/nvidia-cuda-mps-control, with a stand-in daemon process
(argv[0] `nvidia-cuda-mps-control`, CUDA_MPS_PIPE_DIRECTORY in its environment) and pid file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE_CONTROL = str(HERE / "fakebin" / "nvidia-cuda-mps-control")
SCENARIOS = HERE / "scenarios"


class FakeDaemon:
    def __init__(self, root: Path, scenario: str, *, process: bool = True) -> None:
        self.pipe_dir = root / scenario / "pipe"
        self.pipe_dir.mkdir(parents=True)
        (self.pipe_dir / "control").touch()
        self.scenario = json.loads((SCENARIOS / f"{scenario}.json").read_text())
        self._write()
        self.process = None
        self.server = None
        if process:
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir)}
            # argv as a real daemon's: `nvidia-cuda-mps-control ... -d`
            stand_in = f"exec -a nvidia-cuda-mps-control {sys.executable} -c 'import time; time.sleep(600)' -d"
            self.process = subprocess.Popen(["bash", "-c", stand_in], env=env)
            (self.pipe_dir / "nvidia-cuda-mps-control.pid").write_text(f"{self.process.pid}\n")

    def start_server_stand_in(self) -> int:
        """A process that looks like this daemon's MPS server (argv[0], environment): left running
        after kill(), it is the orphaned server a killed daemon leaves behind."""
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir)}
        stand_in = f"exec -a nvidia-cuda-mps-server {sys.executable} -c 'import time; time.sleep(600)'"
        self.server = subprocess.Popen(["bash", "-c", stand_in], env=env)
        return self.server.pid

    def _write(self) -> None:
        tmp = self.pipe_dir / "scenario.json.tmp"
        tmp.write_text(json.dumps(self.scenario))
        tmp.replace(self.pipe_dir / "scenario.json")

    def update(self, **changes) -> None:
        self.scenario.update(changes)
        self._write()

    @property
    def path(self) -> str:
        return str(self.pipe_dir)

    def commands(self) -> list[str]:
        log = self.pipe_dir / "commands.log"
        return log.read_text().splitlines() if log.exists() else []

    def kill(self) -> None:
        """kill -9: the pid file stays behind, naming a dead PID."""
        if self.process:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        for process in (self.process, self.server):
            if process and process.poll() is None:
                process.kill()
                process.wait()
