"""The benchmarks' nodes, staged on a CPU machine for the agent's own collectors: engines as
tests.kit.fakevllm processes (the first MPS clients of each GPU), the control program's replies in
replay mode, a real server.log, the fake NVML's layout.

  reference: 1 GPU, 2 MPS clients, 2 engines
  large:     8 GPUs, 48 MPS clients per GPU, 16 engines
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mpswatch.cli import build_collectors
from mpswatch.collectors import Collector
from mpswatch.config import load_config
from mpswatch.injection import Injected
from mpswatch.scheduler import Scheduler, SnapshotStore

from tests.kit import fakenvml, fakevllm
from tests.kit.agentproc import REPO, free_port
from tests.kit.fakecontrol import write_reply
from tests.kit.fakedaemon import FAKE_CONTROL
from tests.kit.scope import SessionProcesses

PS_HEADER = "PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND        \n"


def make_daemon(root: Path, gpus: int, clients: list[list[int]]) -> Path:
    """A pipe dir the fake control program answers in replay mode."""
    pipe = root / "pipe"
    pipe.mkdir(parents=True)
    (pipe / "control").touch()
    replies = {
        "get_server_list": "476\n",
        "get_server_status 476": "ACTIVE\n",
        "get_active_thread_percentage 476": "100.0\n",
        "get_default_active_thread_percentage": "100.0\n",
        "get_default_device_pinned_mem_limit 0": "",
        "ps": PS_HEADER + "".join(
            f"{pid:<10}{i + 1:<10}{476:<15}{f'GPU-{gpu:08x}-2b6d-037a':<26}{4026531836:<15}{'python3':<15}\n"
            for gpu in range(gpus) for i, pid in enumerate(clients[gpu])),
    }
    for command, text in replies.items():
        write_reply(pipe, command, text)
    return pipe


def start_engines(count: int, full_bodies: bool = False) -> list[subprocess.Popen]:
    options = ["--full-size-body"] if full_bodies else []
    engines = [subprocess.Popen(fakevllm.command(free_port(), f"engine-{i}", *options), stdout=subprocess.PIPE, text=True)
               for i in range(count)]
    return [fakevllm.wait_ready(engine) for engine in engines]


NODES = {"reference": (1, 2, 2), "large": (8, 48, 16)}  # GPUs, MPS clients per GPU, engines


@contextmanager
def node(name: str, gpus: int, clients_per_gpu: int, engine_count: int, full_bodies: bool = False) -> Iterator[dict]:
    """A node's stand-ins, shared with benchmarks/floor.py: the engine processes (the first MPS
    clients of each GPU), the control program's replies, a real server.log, the fake NVML's layout
    (FAKENVML_LAYOUT in `env`, read by tests.kit.fakenvml.from_layout)."""
    work = Path(tempfile.mkdtemp(prefix=f"mpswatch-bench-{name}-"))
    engines = start_engines(engine_count, full_bodies)
    try:
        engine_pids = [e.pid for e in engines]
        clients = []
        for gpu in range(gpus):
            mine = engine_pids[gpu * engine_count // gpus:(gpu + 1) * engine_count // gpus]
            clients.append(mine + [100000 + gpu * 1000 + i for i in range(clients_per_gpu - len(mine))])
        pipe = make_daemon(work, gpus, clients)
        log_dir = work / "log"
        log_dir.mkdir()
        server_log = REPO / "tests/fixtures/h200-driver580/session3-50-clients-then-fault-server.log"
        (log_dir / "server.log").write_text(server_log.read_text())
        env = {"FAKENVML_LAYOUT": json.dumps({"gpus": gpus, "clients": clients})}
        yield {"work": work, "pipe": pipe, "log_dir": log_dir, "env": env, "engines": engines}
    finally:
        for engine in engines:
            engine.kill()
            engine.wait()


def collectors(setup: dict, visible: Callable[[int], bool]) -> list[Collector[Any]]:
    """The agent's own collectors for a staged node, built from its configuration as `mpswatch run`
    builds them, seeing only the processes `visible` lets through."""
    os.environ["FAKENVML_LAYOUT"] = setup["env"]["FAKENVML_LAYOUT"]  # read by the fake when loaded
    config = load_config(
        None,
        env={},
        flags={"mps_control.pipe_dirs": [str(setup["pipe"])], "mps_control.control_bin": FAKE_CONTROL,
               "mps_logs.log_dirs": [str(setup["log_dir"])]},
    )
    return build_collectors(config, Injected(nvml_loader=fakenvml.from_layout, process_filter=lambda root: visible))


def settled_scheduler(setup: dict) -> Scheduler:
    """The agent's collectors for a staged node, run until every engine is up, then once more a
    second later: each figure taken over two samples is there too (rates, GPM)."""
    scheduler = Scheduler(collectors(setup, SessionProcesses()), SnapshotStore())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snapshot = scheduler.run_once()
        if snapshot.engines is not None and all(e.up for e in snapshot.engines.engines):
            break
        time.sleep(0.5)
    time.sleep(1.0)
    scheduler.run_once()
    return scheduler
