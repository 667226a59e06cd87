"""Issue 19: a daemon is asked only when cheap signals (its logs, /proc, NVML) show a change, with a liveness
query and a heartbeat, so that the agent's own commands stop growing its control.log."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mpswatch.collectors.mps_control import (
    CheapSignals,
    DiscoverySettings,
    MpsControlCollector,
    cheap_signals,
    render,
)
from mpswatch.metrics import Families
from mpswatch.procfs import ProcFS
from mpswatch.snapshot import (
    DaemonState,
    DerivedFacts,
    GpuData,
    GpuProcess,
    GpuState,
    LogDirState,
    MpsLogsData,
    frozen_map,
)

from tests.test_mps_control_probe import HEALTHY, PS, ScriptedRunner, fake_proc, pipe_dir_with_pid

DAEMON, SERVER = 429, 476
TWO_CLIENTS = PS + "438       2         476            GPU-2ea0ea17-0206-eb44    4026531836     python3\n"


class Signals:
    """What the other collectors would have seen: set by the test."""

    def __init__(self) -> None:
        self.now = CheapSignals(log_events=0, gpu_clients=frozenset({437}))

    def __call__(self) -> CheapSignals:
        return self.now


def daemon_with_servers(proc: Path, *servers: int, state: str = "S") -> None:
    """The daemon's /proc entry, its one thread listing the servers it forked as its children."""
    if not (proc / str(DAEMON)).exists():
        fake_proc(proc, DAEMON, "nvidia-cuda-mps-control", state=state)
    (proc / str(DAEMON) / "stat").write_text(f"{DAEMON} (nvidia-cuda-mps) {state} 1 2 3")
    task = proc / str(DAEMON) / "task" / str(DAEMON)
    task.mkdir(parents=True, exist_ok=True)
    (task / "children").write_text("".join(f"{pid} " for pid in servers))


def collector_for(tmp_path: Path, runner: ScriptedRunner, signals: Signals | None, *, heartbeat: float = 3600.0,
                  liveness: float = 3600.0) -> MpsControlCollector:
    proc = tmp_path / "proc"
    daemon_with_servers(proc, SERVER)
    fake_proc(proc, SERVER, "nvidia-cuda-mps-server")
    pipe = pipe_dir_with_pid(tmp_path, DAEMON)
    return MpsControlCollector(control_bin="nvidia-cuda-mps-control", discovery=DiscoverySettings(pipe_dirs=(str(pipe),)),
                               procfs=ProcFS(proc), runner=runner, signals=signals, heartbeat_seconds=heartbeat,
                               liveness_seconds=liveness, settings_refresh_seconds=3600)


def sent_by(collector: MpsControlCollector, runner: ScriptedRunner) -> list[str]:
    before = len(runner.sent)
    collector.collect()
    return runner.sent[before:]


def test_an_unchanged_daemon_is_not_asked_again_within_the_heartbeat(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals())
    first = collector.collect().daemons[0]
    assert first.up and len(runner.sent) == 6
    for _ in range(5):
        assert sent_by(collector, runner) == []
    data = collector.collect()
    assert data.daemons[0].clients == first.clients and data.daemons[0].poll_mode == "on_change"


def test_a_change_the_logs_do_not_show_reaches_the_data_within_the_heartbeat(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals(), heartbeat=1.0)
    assert len(collector.collect().daemons[0].clients) == 1
    runner.replies = {**HEALTHY, "ps": TWO_CLIENTS}  # a client the logs, NVML and /proc say nothing of
    time.sleep(1.1)
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "ps"]
    assert [c.pid for c in collector.collect().daemons[0].clients] == [437, 438]


def test_a_log_event_sends_a_full_query_at_the_next_cycle(tmp_path):
    runner, signals = ScriptedRunner(HEALTHY), Signals()
    collector = collector_for(tmp_path, runner, signals)
    collector.collect()
    runner.replies = {**HEALTHY, "ps": TWO_CLIENTS}
    signals.now = CheapSignals(log_events=1, gpu_clients=signals.now.gpu_clients)
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "ps"]
    assert len(collector.collect().daemons[0].clients) == 2
    assert sent_by(collector, runner) == []


def test_a_new_mps_client_in_nvml_sends_a_full_query(tmp_path):
    runner, signals = ScriptedRunner(HEALTHY), Signals()
    collector = collector_for(tmp_path, runner, signals)
    collector.collect()
    signals.now = CheapSignals(log_events=0, gpu_clients=frozenset({437, 438}))
    assert "ps" in sent_by(collector, runner)


def test_a_server_process_started_or_gone_in_proc_sends_a_full_query(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals())
    collector.collect()
    daemon_with_servers(tmp_path / "proc")  # its server exited
    runner.replies = {**HEALTHY, "get_server_list": ""}
    assert sent_by(collector, runner) == ["get_server_list"]
    assert collector.collect().daemons[0].servers == ()


def test_a_stopped_daemon_is_asked_at_once_and_seen_hung(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals())
    collector.collect()
    daemon_with_servers(tmp_path / "proc", SERVER, state="T")
    runner.timeout_on = {"get_server_list"}
    daemon = collector.collect().daemons[0]
    assert daemon.state is DaemonState.HUNG and "stopped" in daemon.reason


def test_a_dead_daemon_is_seen_at_the_next_cycle(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals())
    collector.collect()
    for path in sorted((tmp_path / "proc" / str(DAEMON)).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (tmp_path / "proc" / str(DAEMON)).rmdir()
    runner.not_running = True
    assert collector.collect().daemons[0].state is DaemonState.STALE_PID_FILE


def test_a_daemon_that_looks_alive_but_hangs_is_seen_at_the_liveness_query(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals(), liveness=0.5)
    collector.collect()
    time.sleep(0.6)
    assert sent_by(collector, runner) == ["get_server_list"]  # same servers: nothing more is asked
    daemon = collector.collect().daemons[0]
    assert daemon.up and len(daemon.clients) == 1 and set(daemon.command_durations) >= {"ps", "get_server_list"}
    runner.timeout_on = {"get_server_list"}
    time.sleep(0.6)
    assert collector.collect().daemons[0].state is DaemonState.HUNG


def test_a_changed_server_list_at_the_liveness_query_is_asked_in_full_at_once(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals(), liveness=0.5)
    collector.collect()
    runner.replies = {**HEALTHY, "get_server_list": "476\n480\n", "get_server_status 480": "ACTIVE\n",
                      "get_active_thread_percentage 480": "50.0\n"}
    time.sleep(0.6)
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "get_server_status 480",
                                          "get_active_thread_percentage 480", "ps"]
    assert [s.pid for s in collector.collect().daemons[0].servers] == [476, 480]


def test_without_readable_logs_every_cycle_asks_in_full_and_says_so(tmp_path):
    runner, signals = ScriptedRunner(HEALTHY), Signals()
    signals.now = CheapSignals(log_events=None, gpu_clients=frozenset({437}))
    collector = collector_for(tmp_path, runner, signals)
    collector.collect()
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "ps"]
    data = collector.collect()
    assert any("control.log can be read" in note for note in data.discovery_notes)
    out = Families()
    render(data, DerivedFacts(), out)
    family = next(f for f in out if f.name == "mps_control_poll_mode")
    modes = {sample.labels["mode"]: sample.value for sample in family.samples}
    assert modes == {"on_change": 0, "every_cycle": 1}


def test_a_heartbeat_of_zero_asks_every_cycle_as_before(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals(), heartbeat=0)
    collector.collect()
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "ps"]
    assert collector.collect().daemons[0].poll_mode == "every_cycle"


def _log_dir(sources: tuple[str, ...], events: int) -> LogDirState:
    return LogDirState("/var/log/nvidia-mps", "default", sources, frozen_map({("server", "client_connected"): events}),
                       frozen_map({}), frozen_map({}), frozen_map({}), frozen_map({}))


def test_cheap_signals_need_a_readable_control_log_and_every_gpu_s_process_list():
    gpu = GpuData("580", (GpuState(0, "GPU-1", "H200", True, processes=(GpuProcess(437, "mps_client", None),
                                                                          GpuProcess(476, "mps_server", None))),))
    readable = MpsLogsData(dirs=(_log_dir(("control", "server"), 3),), recent=())
    assert cheap_signals(readable, gpu) == CheapSignals(3, frozenset({437}))
    assert cheap_signals(MpsLogsData(dirs=(_log_dir(("server",), 3),), recent=()), None) == CheapSignals(None, None)
    hidden = GpuData("580", (GpuState(0, "GPU-1", "H200", True, processes=None),))
    assert cheap_signals(None, hidden) == CheapSignals(None, None)


def test_the_cpu_of_the_control_program_runs_is_exported(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    data = collector_for(tmp_path, runner, Signals()).collect()
    out = Families()
    render(data, DerivedFacts(), out)
    [family] = [f for f in out if f.name == "mps_control_program_cpu_seconds"]
    reaped = os.times()
    assert family.type == "counter" and 0 <= family.samples[0].value <= reaped.children_user + reaped.children_system


def test_a_daemon_whose_children_proc_does_not_list_is_asked_every_cycle(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    collector = collector_for(tmp_path, runner, Signals())
    (tmp_path / "proc" / str(DAEMON) / "task" / str(DAEMON) / "children").unlink()  # a kernel without the file
    collector.collect()
    assert sent_by(collector, runner) == ["get_server_list", "get_server_status 476", "ps"]
    assert collector.collect().daemons[0].poll_mode == "every_cycle"
