"""One daemon probed through an injected runner and a fake /proc tree: what each failure looks like."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mpswatch.collectors.mps_control import (
    ControlChannel,
    DiscoverySettings,
    MpsControlCollector,
    MutatingCommandRefused,
    discover_pipe_dirs,
    probe_daemon,
    read_pid_file,
    servers_lost,
    state_changes,
)
from mpswatch.procfs import ProcFS
from mpswatch.runner import RunResult
from mpswatch.snapshot import DaemonState, MpsClient, MpsDaemon, MpsServer

PS = (
    "PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND\n"
    "437       1         476            GPU-2ea0ea17-0206-eb44    4026531836     python3\n"
)
HEALTHY = {
    "get_server_list": "476\n",
    "get_server_status 476": "ACTIVE\n",
    "get_active_thread_percentage 476": "100.0\n",
    "ps": PS,
    "get_default_active_thread_percentage": "100.0\n",
    "get_default_device_pinned_mem_limit 0": "",
}


class ScriptedRunner:
    """Answers each command line from a table; records what was sent."""

    def __init__(self, replies=None, timeout_on=(), not_running=False, exec_error=None):
        self.replies = replies or {}
        self.timeout_on = set(timeout_on)
        self.not_running = not_running
        self.exec_error = exec_error
        self.sent: list[str] = []

    def __call__(self, argv, stdin, env, timeout, give_up=None):
        line = stdin.decode().strip()
        self.sent.append(line)
        assert env["CUDA_MPS_PIPE_DIRECTORY"]
        if self.exec_error:
            return RunResult(None, "", 0.0, exec_error=self.exec_error)
        if line.split()[0] in self.timeout_on:
            return RunResult(None, "", timeout, timed_out=True)
        if self.not_running:
            return RunResult(1, "Cannot find MPS control daemon process\n", 0.001)
        return RunResult(0, self.replies.get(line, f'Unknown command "{line}"\n'), 0.001)


def fake_proc(root: Path, pid: int, argv0: str, state: str = "S", uid: int = 0, environ: str = "") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(argv0.encode() + b"\0-d\0")
    (d / "stat").write_text(f"{pid} (nvidia-cuda-mps) {state} 1 2 3")
    (d / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "environ").write_bytes(environ.encode())


def pipe_dir_with_pid(tmp_path: Path, pid: int) -> Path:
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "control").touch()
    (pipe / "nvidia-cuda-mps-control.pid").write_text(f"{pid}\n")
    return pipe


def probe(tmp_path, runner, pipe, procfs=None):
    channel = ControlChannel(str(pipe), "nvidia-cuda-mps-control", runner, 2.0)
    return probe_daemon(str(pipe), "configured", channel, procfs or ProcFS(tmp_path / "proc"), 48)


def test_a_healthy_daemon_reports_servers_clients_and_the_server_uid(tmp_path):
    fake_proc(tmp_path / "proc", 429, "nvidia-cuda-mps-control")
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server", uid=1000)
    daemon = probe(tmp_path, ScriptedRunner(HEALTHY), pipe_dir_with_pid(tmp_path, 429))
    assert daemon.state is DaemonState.UP and daemon.pid == 429
    assert daemon.servers == (MpsServer(476, 1000, "ACTIVE", 100.0),)
    assert [c.pid for c in daemon.clients] == [437]
    assert daemon.default_pinned_memory_limit_bytes is None
    assert daemon.command_failures == {} and set(daemon.command_durations) == {
        "get_server_list", "get_server_status", "get_active_thread_percentage", "ps",
        "get_default_active_thread_percentage", "get_default_device_pinned_mem_limit",
    }


def test_a_killed_daemon_is_told_apart_by_its_stale_pid_file(tmp_path):
    (tmp_path / "proc").mkdir()
    daemon = probe(tmp_path, ScriptedRunner(not_running=True), pipe_dir_with_pid(tmp_path, 4242))
    assert daemon.state is DaemonState.STALE_PID_FILE
    assert "4242" in daemon.reason and daemon.command_failures == {("get_server_list", "not_running"): 1}


def test_a_killed_daemon_names_the_server_it_left_running_for_its_pipe_dir_only(tmp_path):
    pipe = pipe_dir_with_pid(tmp_path, 4242)
    fake_proc(tmp_path / "proc", 476, "/usr/bin/nvidia-cuda-mps-server", environ=f"CUDA_MPS_PIPE_DIRECTORY={pipe}/\0")
    fake_proc(tmp_path / "proc", 502, "nvidia-cuda-mps-server", environ="CUDA_MPS_PIPE_DIRECTORY=/elsewhere\0")
    daemon = probe(tmp_path, ScriptedRunner(not_running=True), pipe)
    assert daemon.state is DaemonState.STALE_PID_FILE and daemon.orphaned_server_pids == (476,)
    assert "MPS server 476 runs on without it" in daemon.reason


def test_orphans_are_unknown_when_a_server_environment_is_hidden(tmp_path):
    class HidingProcFS(ProcFS):
        def environ(self, pid):
            raise PermissionError(pid)

    pipe = pipe_dir_with_pid(tmp_path, 4242)
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server")
    daemon = probe(tmp_path, ScriptedRunner(not_running=True), pipe, HidingProcFS(tmp_path / "proc"))
    assert daemon.orphaned_server_pids is None and "orphaned" not in daemon.reason


def test_an_answering_daemon_has_no_orphan_count(tmp_path):
    fake_proc(tmp_path / "proc", 429, "nvidia-cuda-mps-control")
    daemon = probe(tmp_path, ScriptedRunner(HEALTHY), pipe_dir_with_pid(tmp_path, 429))
    assert daemon.orphaned_server_pids is None


def test_no_pid_file_and_no_daemon_is_plain_not_running(tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    daemon = probe(tmp_path, ScriptedRunner(not_running=True), pipe)
    assert daemon.state is DaemonState.NOT_RUNNING


def test_a_stopped_daemon_is_hung_and_the_reason_says_it_is_stopped(tmp_path):
    fake_proc(tmp_path / "proc", 429, "nvidia-cuda-mps-control", state="T")
    daemon = probe(
        tmp_path, ScriptedRunner(HEALTHY, timeout_on={"get_server_list"}), pipe_dir_with_pid(tmp_path, 429)
    )
    assert daemon.state is DaemonState.HUNG and "stopped" in daemon.reason
    assert daemon.command_durations["get_server_list"] == 2.0 and daemon.command_failures == {("get_server_list", "timeout"): 1}


def test_a_daemon_that_hangs_mid_cycle_is_hung_and_is_not_asked_again(tmp_path):
    runner = ScriptedRunner(HEALTHY, timeout_on={"ps"})
    daemon = probe(tmp_path, runner, pipe_dir_with_pid(tmp_path, 429))
    assert daemon.state is DaemonState.HUNG and daemon.servers == ()
    assert runner.sent[-1] == "ps"


def test_a_server_that_vanished_between_two_commands_keeps_the_daemon_up(tmp_path):
    replies = {**HEALTHY, "get_server_status 476": "Server 476 not found\n"}
    daemon = probe(tmp_path, ScriptedRunner(replies), pipe_dir_with_pid(tmp_path, 429))
    assert daemon.up and daemon.servers[0].status is None
    assert ("get_server_status", "error_reply") in daemon.command_failures


def test_a_missing_control_program_is_exec_failed(tmp_path):
    runner = ScriptedRunner(exec_error="nvidia-cuda-mps-control: No such file or directory")
    daemon = probe(tmp_path, runner, pipe_dir_with_pid(tmp_path, 429))
    assert daemon.state is DaemonState.EXEC_FAILED and "No such file" in daemon.reason


def test_garbage_to_the_first_command_is_garbage_output(tmp_path):
    daemon = probe(tmp_path, ScriptedRunner({"get_server_list": "\x00\x07junk\n"}), pipe_dir_with_pid(tmp_path, 429))
    assert daemon.state is DaemonState.GARBAGE and daemon.command_failures == {("get_server_list", "garbage_output"): 1}


def test_a_configured_pipe_dir_that_does_not_exist_is_reported(tmp_path):
    daemon = probe(tmp_path, ScriptedRunner(HEALTHY), tmp_path / "absent")
    assert daemon.state is DaemonState.NO_PIPE_DIR


def test_a_mutating_command_never_reaches_the_runner(tmp_path):
    runner = ScriptedRunner(HEALTHY)
    channel = ControlChannel(str(tmp_path), "nvidia-cuda-mps-control", runner, 2.0)
    for verb in ("quit", "set_default_active_thread_percentage", "terminate_client"):
        with pytest.raises(MutatingCommandRefused):
            channel.ask(verb, 1)
    assert runner.sent == []


def test_discovery_finds_default_device_plugin_and_process_pipe_dirs(tmp_path):
    default = tmp_path / "tmp-nvidia-mps"
    default.mkdir()
    (default / "control").touch()
    empty_default = tmp_path / "run-nvidia-mps"
    empty_default.mkdir()  # exists but never held a daemon: not reported
    plugin = tmp_path / "plugin" / "nvidia.com" / "gpu" / "pipe"
    plugin.mkdir(parents=True)
    (plugin / "nvidia-cuda-mps-control.pid").write_text("77")
    fake_proc(tmp_path / "proc", 501, "/usr/bin/nvidia-cuda-mps-control",
              environ="HOME=/root\0CUDA_MPS_PIPE_DIRECTORY=/srv/mps/pipe/\0")
    fake_proc(tmp_path / "proc", 502, "/usr/bin/nvidia-cuda-mps-server",
              environ="CUDA_MPS_PIPE_DIRECTORY=/elsewhere\0")
    settings = DiscoverySettings(default_pipe_dirs=(str(default), str(empty_default)),
                                 device_plugin_root=str(tmp_path / "plugin"))
    discovered = discover_pipe_dirs(settings, ProcFS(tmp_path / "proc"))
    found, notes = discovered.dirs, discovered.notes
    assert dict(found) == {str(default): "default", str(plugin): "device_plugin", "/srv/mps/pipe": "process"}
    assert notes == []


def test_a_device_plugin_daemons_own_view_of_its_dirs_is_not_a_second_daemon(tmp_path):
    # the plugin starts its daemon in a container where the root is /mps: its environment names
    # /mps/nvidia.com/gpu/pipe, which is the host's <root>/nvidia.com/gpu/pipe
    plugin = tmp_path / "plugin" / "nvidia.com" / "gpu" / "pipe"
    plugin.mkdir(parents=True)
    (plugin / "control").touch()
    fake_proc(tmp_path / "proc", 61, "nvidia-cuda-mps-control", environ="CUDA_MPS_PIPE_DIRECTORY=/mps/nvidia.com/gpu/pipe\0")
    fake_proc(tmp_path / "proc", 62, "nvidia-cuda-mps-control", environ="CUDA_MPS_PIPE_DIRECTORY=/srv/gone/pipe\0")
    settings = DiscoverySettings(default_pipe_dirs=(), device_plugin_root=str(tmp_path / "plugin"))
    found = discover_pipe_dirs(settings, ProcFS(tmp_path / "proc")).dirs
    assert dict(found) == {str(plugin): "device_plugin", "/srv/gone/pipe": "process"}


def test_discovery_says_when_a_daemon_environment_cannot_be_read(tmp_path):
    fake_proc(tmp_path / "proc", 501, "nvidia-cuda-mps-control")

    class Unreadable(ProcFS):
        def environ(self, pid):
            raise PermissionError(pid)

    discovered = discover_pipe_dirs(DiscoverySettings(default_pipe_dirs=(str(tmp_path / "x"),),
                                                      device_plugin_root=str(tmp_path / "y")),
                                    Unreadable(tmp_path / "proc"))
    assert discovered.dirs == [] and "501" in discovered.notes[0] and "CAP_SYS_PTRACE" in discovered.notes[0]
    assert discovered.unreadable == {"permission": 1}


def test_configured_pipe_dirs_restrict_discovery(tmp_path):
    fake_proc(tmp_path / "proc", 501, "nvidia-cuda-mps-control", environ="CUDA_MPS_PIPE_DIRECTORY=/srv/a\0")
    discovered = discover_pipe_dirs(DiscoverySettings(pipe_dirs=("/only/this",)), ProcFS(tmp_path / "proc"))
    assert discovered.dirs == [("/only/this", "configured")]
    assert discovered.unreadable is None  # no daemon looked at


def _daemon(state=DaemonState.UP, servers=(), clients=()):
    return MpsDaemon("/p", "configured", state, "", pid=1, servers=servers, clients=clients)


def _events(prev, cur):
    return [event for _, event, _ in state_changes(prev, cur)]


def test_state_changes_are_reported_once_not_every_cycle():
    fault = _daemon(servers=(MpsServer(476, 0, "FAULT", 100.0),))
    assert _events(None, fault) == ["daemon_up", "server_seen", "server_fault"]
    assert _events(fault, fault) == []
    active = _daemon(servers=(MpsServer(476, 0, "ACTIVE", 100.0),))
    assert _events(fault, active) == ["server_recovered"]
    hung = _daemon(DaemonState.HUNG)
    assert _events(active, hung) == ["daemon_down"]
    assert _events(hung, hung) == []
    assert _events(hung, _daemon(DaemonState.STALE_PID_FILE)) == ["daemon_down"]


def test_reaching_the_client_limit_is_reported_when_it_is_reached():
    clients = tuple(MpsClient(1000 + i, i, 476, "GPU-a", "ns", "python3") for i in range(48))
    server = (MpsServer(476, 0, "ACTIVE", 100.0),)
    below, full = _daemon(servers=server, clients=clients[:47]), _daemon(servers=server, clients=clients)
    assert _events(below, full) == ["client_limit_reached"]
    assert _events(full, full) == []


def test_never_two_commands_in_flight_to_one_daemon(tmp_path):
    import threading
    import time

    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def slow_runner(argv, stdin, env, timeout, give_up=None):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return RunResult(0, "476\n", 0.02)

    channel = ControlChannel(str(tmp_path), "nvidia-cuda-mps-control", slow_runner, 2.0)
    threads = [threading.Thread(target=channel.ask, args=("get_server_list",)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1


def test_a_reply_with_a_huge_number_is_garbage_not_a_crash(tmp_path):
    daemon = probe(tmp_path, ScriptedRunner({**HEALTHY, "get_server_list": "9" * 5000 + "\n"}),
                                pipe_dir_with_pid(tmp_path, 429))
    assert daemon.state is DaemonState.GARBAGE and daemon.command_failures == {("get_server_list", "garbage_output"): 1}


def test_a_fifo_in_place_of_the_pid_file_does_not_block(tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    os.mkfifo(pipe / "nvidia-cuda-mps-control.pid")
    started = time.monotonic()
    assert read_pid_file(str(pipe)) is None
    assert time.monotonic() - started < 1.0


def test_an_unreadable_client_list_is_unknown_not_empty(tmp_path):
    daemon = probe(tmp_path, ScriptedRunner({**HEALTHY, "ps": "Segmentation fault\n"}),
                                pipe_dir_with_pid(tmp_path, 429))
    assert daemon.up and daemon.clients is None and ("ps", "garbage_output") in daemon.command_failures


def test_one_daemon_s_surprise_costs_only_that_daemon(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d in (good, bad):
        d.mkdir()

    def runner(argv, stdin, env, timeout, give_up=None):
        if env["CUDA_MPS_PIPE_DIRECTORY"] == str(bad):
            raise RuntimeError("surprise")
        return ScriptedRunner(HEALTHY)(argv, stdin, env, timeout)

    (tmp_path / "proc").mkdir()
    collector = MpsControlCollector(
        control_bin="nvidia-cuda-mps-control", discovery=DiscoverySettings(pipe_dirs=(str(good), str(bad))),
        procfs=ProcFS(tmp_path / "proc"), runner=runner,
    )
    states = {d.pipe_dir: d.state for d in collector.collect().daemons}
    assert states == {str(good): DaemonState.UP, str(bad): DaemonState.GARBAGE}


def test_a_daemon_without_pipe_directory_variable_uses_the_mps_default(tmp_path):
    fake_proc(tmp_path / "proc", 501, "nvidia-cuda-mps-control", environ="HOME=/root\0")
    found = discover_pipe_dirs(DiscoverySettings(default_pipe_dirs=(), device_plugin_root=str(tmp_path / "k")),
                               ProcFS(tmp_path / "proc")).dirs
    assert found == [("/tmp/nvidia-mps", "process")]


def test_one_off_client_runs_of_the_control_program_are_not_daemons(tmp_path):
    d = tmp_path / "proc" / "601"
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"nvidia-cuda-mps-control\0")  # `echo ps | nvidia-cuda-mps-control`
    (d / "environ").write_bytes(b"CUDA_MPS_PIPE_DIRECTORY=/srv/job-42\0")
    found = discover_pipe_dirs(DiscoverySettings(default_pipe_dirs=(), device_plugin_root=str(tmp_path / "k")),
                               ProcFS(tmp_path / "proc")).dirs
    assert found == []


def test_a_removed_pipe_dir_is_forgotten_but_a_dead_daemon_s_is_not(tmp_path):
    (tmp_path / "proc").mkdir()
    dead, removed = tmp_path / "dead", tmp_path / "removed"
    for d in (dead, removed):
        d.mkdir()
        (d / "control").touch()
    settings = DiscoverySettings(default_pipe_dirs=(str(dead), str(removed)), device_plugin_root=str(tmp_path / "k"))
    collector = MpsControlCollector(control_bin="nvidia-cuda-mps-control", discovery=settings,
                                    procfs=ProcFS(tmp_path / "proc"), runner=ScriptedRunner(not_running=True))
    assert len(collector.collect().daemons) == 2
    (removed / "control").unlink()
    removed.rmdir()
    assert [d.pipe_dir for d in collector.collect().daemons] == [str(dead)]


def test_a_status_that_could_not_be_read_once_is_not_a_recovery():
    fault = _daemon(servers=(MpsServer(476, 0, "FAULT", 100.0),))
    unknown = _daemon(servers=(MpsServer(476, 0, None, 100.0),))
    assert _events(fault, unknown) == []


def test_settings_are_read_once_per_settings_interval_to_spare_the_control_log(tmp_path):
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server")
    runner = ScriptedRunner(HEALTHY)
    collector = MpsControlCollector(
        control_bin="nvidia-cuda-mps-control", discovery=DiscoverySettings(pipe_dirs=(str(pipe_dir_with_pid(tmp_path, 429)),)),
        procfs=ProcFS(tmp_path / "proc"), runner=runner, settings_refresh_seconds=60,
    )
    first = collector.collect().daemons[0]
    sent_first = len(runner.sent)
    second = collector.collect().daemons[0]
    assert sent_first == 6
    assert runner.sent[sent_first:] == ["get_server_list", "get_server_status 476", "ps"]
    assert second.default_active_thread_percentage == first.default_active_thread_percentage == 100.0
    assert second.servers[0].active_thread_percentage == 100.0


def test_an_unanswered_default_pinned_limit_is_unknown_while_an_empty_answer_is_no_limit(tmp_path):
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server")
    no_limit = probe(tmp_path, ScriptedRunner(HEALTHY), pipe_dir_with_pid(tmp_path, 429))
    assert (no_limit.default_pinned_memory_limit_bytes, no_limit.default_pinned_memory_limit_known) == (None, True)
    unanswered = {k: v for k, v in HEALTHY.items() if not k.startswith("get_default_device_pinned_mem_limit")}
    other = tmp_path / "other"
    other.mkdir()
    failed = probe(tmp_path, ScriptedRunner(unanswered), other)
    assert (failed.default_pinned_memory_limit_bytes, failed.default_pinned_memory_limit_known) == (None, False)


def test_a_daemon_under_the_device_plugins_root_is_named_by_its_resource_and_keeps_it(tmp_path):
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server")
    plugin = tmp_path / "mps" / "nvidia.com" / "gpu" / "pipe"
    plugin.mkdir(parents=True)
    (plugin / "control").touch()
    elsewhere = pipe_dir_with_pid(tmp_path, 429)
    runner = ScriptedRunner({**HEALTHY, "get_default_device_pinned_mem_limit 0": "71885M\n"})
    collector = MpsControlCollector(
        control_bin="nvidia-cuda-mps-control", procfs=ProcFS(tmp_path / "proc"), runner=runner,
        discovery=DiscoverySettings(pipe_dirs=(str(plugin), str(elsewhere)), device_plugin_root=str(tmp_path / "mps")),
    )
    for _ in range(2):  # the second cycle takes the settings from the first
        daemons = {d.pipe_dir: d for d in collector.collect().daemons}
        assert (daemons[str(plugin)].resource, daemons[str(elsewhere)].resource) == ("nvidia.com/gpu", None)
        assert daemons[str(plugin)].default_pinned_memory_limit_bytes == 71885 << 20
        assert daemons[str(plugin)].default_pinned_memory_limit_known


def test_clients_are_named_by_the_full_gpu_uuid_the_driver_lists(tmp_path):
    fake_proc(tmp_path / "proc", 476, "nvidia-cuda-mps-server")
    info = tmp_path / "proc" / "driver" / "nvidia" / "gpus" / "0000:00:06.0"
    info.mkdir(parents=True)
    # as read on an H200, driver 580.159.04
    (info / "information").write_text("Model: \t\t NVIDIA H200\nIRQ:   \t\t 41\n"
                                      "GPU UUID: \t GPU-2ea0ea17-0206-eb44-7b5a-07c4ed6659bf\nVideo BIOS: \t 96.00.a5.00.1a\n")
    collector = MpsControlCollector(
        control_bin="nvidia-cuda-mps-control", discovery=DiscoverySettings(pipe_dirs=(str(pipe_dir_with_pid(tmp_path, 429)),)),
        procfs=ProcFS(tmp_path / "proc"), runner=ScriptedRunner(HEALTHY),
    )
    [client] = collector.collect().daemons[0].clients
    assert client.device == "GPU-2ea0ea17-0206-eb44-7b5a-07c4ed6659bf"


def _serving(servers=(), clients=(), state=DaemonState.UP):
    """A daemon listing `servers` (PIDs) with `clients` as (pid, server) pairs; None: `ps` failed."""
    return _daemon(state, tuple(MpsServer(pid, 0, "ACTIVE", 100.0) for pid in servers),
                   None if clients is None else tuple(MpsClient(pid, 1, server, "GPU-a", "4026531836", "python3")
                                                      for pid, server in clients))


def test_a_server_gone_while_serving_clients_is_lost_once():
    lost, serving = servers_lost(frozenset(), _serving(servers=[476], clients=[(437, 476)]))
    assert (lost, serving) == ([], {476})
    lost, serving = servers_lost(serving, _serving(servers=[], clients=[]))
    assert (lost, serving) == ([476], frozenset())
    assert servers_lost(serving, _serving(servers=[], clients=[])) == ([], frozenset())


def test_a_server_lost_across_a_cycle_whose_ps_failed_is_still_counted():
    _, serving = servers_lost(frozenset(), _serving(servers=[476], clients=[(437, 476)]))
    _, serving = servers_lost(serving, _serving(servers=[476], clients=None))  # `ps`: Server not found
    assert servers_lost(serving, _serving(servers=[], clients=None))[0] == [476]


def test_servers_without_clients_and_servers_gone_with_their_daemon_are_not_lost():
    assert servers_lost(frozenset(), _serving(servers=[], clients=[]))[0] == []  # an idle server shut down
    _, serving = servers_lost(frozenset(), _serving(servers=[476], clients=[(437, 476)]))
    _, serving = servers_lost(serving, _serving(state=DaemonState.NOT_RUNNING))  # quit
    assert servers_lost(serving, _serving(servers=[900], clients=[(901, 900)]))[0] == []


# ---------------------------------------------------------------- issue 17: idle, descendants, busy nodes, many dirs


def _collector_for(daemon, *, timeout=1.0, **kw):
    from tests.kit.fakedaemon import FAKE_CONTROL

    return MpsControlCollector(control_bin=FAKE_CONTROL, discovery=DiscoverySettings(pipe_dirs=(daemon.path,)),
                               command_timeout_seconds=timeout, **kw)


def test_an_idle_daemon_counts_no_failure_cycle_after_cycle(fake_daemon):
    """Finding 14: with no server, `ps` has nothing to answer (`Server not found`): it is not asked."""
    daemon = fake_daemon("idle_daemon_driver580")
    collector = _collector_for(daemon)
    for _ in range(3):
        [state] = collector.collect().daemons
        assert state.up and state.servers == () and state.clients == ()
        assert state.command_failures == {}
    assert "ps" not in daemon.commands()


def test_a_control_program_leaving_a_grandchild_on_its_stdout_is_not_hung(fake_daemon):
    """Finding 15: the reader ends at the program's exit, not when every descendant closed stdout."""
    daemon = fake_daemon("healthy_two_clients_driver580")
    daemon.update(grandchild_seconds=30)
    [state] = _collector_for(daemon).collect().daemons
    assert state.state is DaemonState.UP and len(state.clients) == 2 and state.command_failures == {}


def test_a_control_program_slow_to_start_on_a_busy_node_is_not_a_timeout(fake_daemon):
    """Busy nodes must not page: a program still runnable at the 1 s deadline (spinning 1.1 s, as one
    starved of CPU would) gets the deadline once more; the daemon answers, and is up."""
    daemon = fake_daemon("healthy_two_clients_driver580")
    daemon.update(spin_seconds=1.1)
    collector = _collector_for(daemon)
    seen = collector.collect().daemons  # the probe outlasts the cycle's 2 s budget: deferred to the next
    [state] = seen or collector.collect().daemons
    assert state.state is DaemonState.UP and state.command_failures == {}
    assert state.commands_starved_total >= 1
    assert "answering slowly" in state.reason  # its share was used up: the rest is asked next cycle


def test_a_stopped_daemon_is_still_seen_within_3_s(fake_daemon):
    """The control program blocked waiting on a stopped daemon is not starved: no second deadline."""
    import signal

    daemon = fake_daemon("hung_daemon")
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        [state] = _collector_for(daemon).collect().daemons
        elapsed = time.monotonic() - started
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    assert state.state is DaemonState.HUNG and "stopped" in state.reason
    assert elapsed < 3.0


def test_a_thousand_pipe_dirs_degrade_per_daemon_never_to_nothing(tmp_path):
    """Finding 11: 1,000 pipe dirs, 300 whose daemon hangs (each holds a worker for the whole command
    timeout), 696 with no daemon, 4 live ones sorted last. No cycle overruns the collector's deadline;
    the live daemons' data is there by cycle 8 (the hanging ones need 300 × 0.5 s / 32 workers ≈ 5
    budgets of 1 s to be probed once) and fresh every cycle after that; every daemon is probed within
    those cycles."""
    from mpswatch.runner import run_with_deadline
    from mpswatch.scheduler import CollectorLoop, SnapshotStore

    from tests.kit import fakecontrol
    from tests.kit.fakedaemon import FAKE_CONTROL

    dirs = {}
    for i in range(1000):
        kind = "live" if i >= 996 else "hung" if i % 10 < 3 else "dead"
        d = tmp_path / f"{'z' if kind == 'live' else 'a'}-{i:04d}"
        d.mkdir()
        dirs[str(d)] = kind
        if kind == "live":
            for command, text in HEALTHY.items():
                fakecontrol.write_reply(d, command, text)
    assert sum(k == "hung" for k in dirs.values()) == 300

    def runner(argv, stdin, env, timeout, give_up=None):
        kind = dirs[env["CUDA_MPS_PIPE_DIRECTORY"]]
        if kind == "live":
            return run_with_deadline(argv, stdin, env, timeout, give_up=give_up)
        if kind == "hung":
            time.sleep(timeout)  # as a control program blocked on a hung daemon's socket
            return RunResult(None, "", timeout, timed_out=True)
        return RunResult(1, "Cannot find MPS control daemon process\n", 0.002)

    (tmp_path / "proc").mkdir()
    collector = MpsControlCollector(control_bin=FAKE_CONTROL, discovery=DiscoverySettings(pipe_dirs=tuple(dirs)),
                                    command_timeout_seconds=0.5, procfs=ProcFS(tmp_path / "proc"), runner=runner)
    loop = CollectorLoop(collector, SnapshotStore())
    live = [d for d, kind in dirs.items() if kind == "live"]
    first_seen = None
    for cycle in range(1, 11):
        report = loop.cycle()
        assert report.status.success, report.status.error_detail
        daemons = {d.pipe_dir: d for d in report.data.daemons}
        if first_seen is None and all(d in daemons and daemons[d].up for d in live):
            first_seen = cycle
            assert len(daemons[live[0]].clients) == 1
        if first_seen is not None and cycle > first_seen:
            ages = [time.time() - daemons[d].measured_at for d in live]
            assert max(ages) < 2.0  # probed again within this cycle or the one before
    assert first_seen is not None and first_seen <= 8
    assert report.data.not_yet_probed == () and len(report.data.daemons) == 1000
    hung = [d for d in report.data.daemons if dirs[d.pipe_dir] == "hung"]
    assert all(d.state is DaemonState.HUNG for d in hung)


def test_a_starved_control_program_of_a_stopped_daemon_gets_no_second_deadline(fake_daemon):
    """Busy nodes must not page, but a stopped daemon is still seen at the first deadline: its control
    program, still runnable there (spinning 1.5 s), is not given more time when the daemon is stopped."""
    import signal

    daemon = fake_daemon("healthy_two_clients_driver580")
    daemon.update(spin_seconds=1.5)
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        [state] = _collector_for(daemon).collect().daemons
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    assert state.state is DaemonState.HUNG and "stopped" in state.reason
    assert state.commands_starved_total == 0 and state.command_durations["get_server_list"] < 1.5


def test_status_says_how_old_a_deferred_daemon_s_data_is():
    from mpswatch.collectors.mps_control import status
    from mpswatch.snapshot import DerivedFacts, MpsControlData

    daemon = MpsDaemon("/p", "configured", DaemonState.UP, "answering; 0 server(s), 0 client(s)", measured_at=1000.0)
    section = status(MpsControlData(daemons=(daemon,), searched=("/p",), deferred=("/p",), not_yet_probed=("/q",)),
                     DerivedFacts(), 1012.0)
    [entry] = section.entries["daemons"]
    assert entry["age_seconds"] == 12.0 and "as of 12s ago" in entry["reason"]
    assert "1 more not probed yet" in section.summary
