"""A pipe dir answered by the fake control program (FAKE_CONTROL), with a stand-in daemon process
(argv[0] `nvidia-cuda-mps-control`, CUDA_MPS_PIPE_DIRECTORY in its environment) and pid file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.kit import fakecontrol, scope

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
# the program an agent under test runs as nvidia-cuda-mps-control (tests.kit.fakecontrol)
FAKE_CONTROL = fakecontrol.materialise(str(scope.DIRECTORY / "bin"))


def stand_in(argv0: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """A process that only sleeps, with argv[0] `argv0` and `args` after it on its command line, as
    discovery sees a real daemon or server: this interpreter, without site packages."""
    return subprocess.Popen([argv0, "-I", "-S", "-c", "import time; time.sleep(600)", *args],
                            executable=sys.executable, env=env)


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
            self.process = stand_in("nvidia-cuda-mps-control", "-d", env=self._env())  # a daemon's `-d`
            (self.pipe_dir / "nvidia-cuda-mps-control.pid").write_text(f"{self.process.pid}\n")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir)}

    def start_server_stand_in(self) -> int:
        """A process that looks like this daemon's MPS server (argv[0], environment): left running
        after kill(), it is the orphaned server a killed daemon leaves behind."""
        self.server = stand_in("nvidia-cuda-mps-server", env=self._env())
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
