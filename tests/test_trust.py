"""The trust model (README "Trust model"): what a local user's processes, run as nobody, can make the
agent do. Issue 17, findings 4 (an unprivileged user steers the root agent) and 9 (an unprivileged
agent silently misses other users' daemons).

The hostile processes and the unprivileged agents start as root and drop to their user
(tests/kit/nobody.py); their files live in a temporary dir nobody can reach (pytest's is root's alone)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mpswatch.collectors.mps_control import DiscoverySettings, discover_pipe_dirs
from mpswatch.logfollow import LogFollower
from mpswatch.procfs import ProcFS

from tests.kit import nobody, scope
from tests.kit.agentproc import Agent, agent_env, key, mpswatch_cmd
from tests.kit.fakedaemon import FAKE_CONTROL, stand_in
from tests.kit.nobody import NOBODY, NobodyAgent

INTERVAL = 0.5
FAST = {"MPSWATCH_ENGINE_SCRAPE_INTERVAL_SECONDS": str(INTERVAL), "MPSWATCH_MPS_LOGS_INTERVAL_SECONDS": str(INTERVAL),
        "MPSWATCH_MPS_CONTROL_INTERVAL_SECONDS": str(INTERVAL)}
OTHER_USER = NOBODY - 1  # a user that is neither the agent's nor root


@pytest.fixture
def as_root():
    why = nobody.root_can_drop_privileges()
    if why:
        pytest.skip(why)
    os.chmod(scope.DIRECTORY, 0o711)  # an agent run as nobody looks for its defaults inside (absent there)


@pytest.fixture
def shared_tmp():
    """A temporary dir other users can reach."""
    directory = Path(tempfile.mkdtemp(prefix="mpswatch-trust-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


class Recorder:
    """A real HTTP listener that records every request it gets (it answers vLLM-like metrics, so
    that a scrape, should one come, would count as an engine up)."""

    def __init__(self, host: str) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                recorder.requests.append(self.path)
                body = b"vllm:num_requests_running 1\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener_at_127_0_0_5():
    recorder = Recorder("127.0.0.5")
    yield recorder
    recorder.close()


def cycles_later(agent: Agent, collector: str, cycles: int = 3) -> dict:
    """A scrape taken after `collector` has run `cycles` more times."""
    stamp = key("mps_exporter_collector_last_success_timestamp_seconds", collector=collector)
    first = agent.wait_for(lambda s: s.get(stamp))
    return agent.wait_for(lambda s: s if s.get(stamp, 0) >= first + cycles * INTERVAL else None, timeout=30)


def engine_of(samples: dict, port: int) -> str | None:
    names = [dict(labels)["engine"] for name, labels in samples if name == "mps_engine_up"]
    return next((n for n in names if n.endswith(f":{port}")), None)


# ---------------------------------------------------------------- finding 4: engines


def hostile_engine(port: int, uid: int, processes: list) -> tuple[subprocess.Popen, int]:
    """`vllm serve --host 127.0.0.5 --port <port>` run by `uid`, holding a socket of its own elsewhere."""
    process, own_port = nobody.stand_in(["vllm", "serve", "--host", "127.0.0.5", "--port", str(port)],
                                        uid=uid, listen=True)
    processes.append(process)
    return process, own_port


@pytest.mark.usefixtures("as_root")
def test_a_nobody_process_naming_another_s_address_is_never_scraped_by_the_root_agent(listener_at_127_0_0_5,
                                                                                       processes, tmp_path):
    recorder = listener_at_127_0_0_5
    hostile, _ = hostile_engine(recorder.port, NOBODY, processes)
    with Agent(["--pipe-dir", str(tmp_path / "no-pipe"), "--mps-control-bin", FAKE_CONTROL], env=FAST,
               nvml="no_driver") as agent:
        found = agent.wait_for(lambda s: engine_of(s, recorder.port), timeout=15)
        s = cycles_later(agent, "engines")
        assert s[key("mps_engine_up", engine=found)] == 0
        assert s[key("mps_engine_owner_info", engine=found, uid=str(NOBODY))] == 1  # whose claim it is
    report = subprocess.run(mpswatch_cmd("status", "--json", "--pipe-dir", str(tmp_path / "no-pipe"),
                                         "--mps-control-bin", FAKE_CONTROL, nvml="no_driver"),
                            env=agent_env(), capture_output=True, text=True, timeout=60)
    engine = next(e for e in json.loads(report.stdout)["engines"] if e["name"] == found)
    assert engine["owner_uid"] == NOBODY and engine["reason"].endswith(f"; runs as uid {NOBODY}")
    assert engine["reason"].startswith(f"metrics endpoint: port {recorder.port} in network namespace ")
    assert "is held by a socket of another process" in engine["reason"]
    assert recorder.requests == []


@pytest.mark.usefixtures("as_root")
def test_an_unprivileged_agent_does_not_scrape_a_port_it_cannot_tie_to_the_engine(listener_at_127_0_0_5,
                                                                                 processes, tmp_path):
    # the agent as nobody cannot read another user's fd table: in its own network namespace the port the
    # command line names may be anyone's (here root's listener), so it is not scraped
    recorder = listener_at_127_0_0_5
    hostile, _ = hostile_engine(recorder.port, OTHER_USER, processes)
    log = tmp_path / "agent.log"
    with NobodyAgent([hostile.pid], ["--pipe-dir", str(tmp_path / "no-pipe"), "--mps-control-bin", FAKE_CONTROL],
                     env=FAST, log_path=log) as agent:
        found = agent.wait_for(lambda s: engine_of(s, recorder.port), timeout=15)
        s = cycles_later(agent, "engines")
        assert s[key("mps_engine_up", engine=found)] == 0
        # and its environment is closed to the agent: its blind spot is counted (finding 9)
        assert s[key("mps_discovery_unreadable_processes", kind="engine", reason="permission")] == 1
    assert recorder.requests == []
    assert "cannot tell whether the engine's processes hold the socket" in log.read_text()


# ---------------------------------------------------------------- finding 4: MPS logs


def nobody_owns(*paths: Path) -> None:
    for path in paths:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def nobody_daemon(log_dir: Path, tmp: Path, processes: list) -> int:
    """`nvidia-cuda-mps-control -d` run as nobody, started with CUDA_MPS_LOG_DIRECTORY=log_dir."""
    env = {**os.environ, "CUDA_MPS_LOG_DIRECTORY": str(log_dir), "CUDA_MPS_PIPE_DIRECTORY": str(tmp / "no-pipe")}
    process, _ = nobody.stand_in(["-d"], argv0="nvidia-cuda-mps-control", env=env)
    processes.append(process)
    return process.pid


def line(message: str) -> str:
    return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}.000 Control   452] {message}\n"


@pytest.mark.usefixtures("as_root")
def test_a_nobody_daemon_cannot_make_the_root_agent_read_files_its_user_could_not(shared_tmp, processes, tmp_path):
    secrets = shared_tmp / "root-only"
    secrets.mkdir(mode=0o700)
    secret = secrets / "secret"
    secret.write_text(line("Starting control daemon using socket /secret") * 3)
    secret.chmod(0o600)
    # A: links to a root-only file and to /dev/urandom
    links = shared_tmp / "links"
    links.mkdir()
    (links / "control.log").symlink_to(secret)
    (links / "server.log").symlink_to("/dev/urandom")
    nobody_owns(links, links / "control.log", links / "server.log")
    # B: the daemon's own control.log (read), and a hard link to the root-only file (as a file system
    # without protected_hardlinks lets its user make)
    own = shared_tmp / "own"
    own.mkdir()
    (own / "control.log").write_text(line("Starting control daemon using socket /own"))
    os.link(secret, own / "server.log")
    nobody_owns(own, own / "control.log")
    # C: root's dir, named by nobody's daemon
    roots = shared_tmp / "roots"
    roots.mkdir()
    (roots / "control.log").write_text(line("Starting control daemon using socket /root"))
    for log_dir in (links, own, roots):
        nobody_daemon(log_dir, shared_tmp, processes)
    args = ["--pipe-dir", str(tmp_path / "no-pipe"), "--mps-control-bin", FAKE_CONTROL]
    log = tmp_path / "agent.log"
    with Agent(args, env=FAST, nvml="no_driver", log_path=log) as agent:
        a, b, c = str(links), str(own), str(roots)
        agent.wait_for(lambda s: key("mps_log_lines_total", log_dir=a, source="control") in s
                       and key("mps_log_lines_total", log_dir=b, source="control") in s, timeout=15)
        s = cycles_later(agent, "mps_logs")
    for source in ("control", "server"):
        assert s[key("mps_log_lines_total", log_dir=a, source=source)] == 0
        assert s[key("mps_log_read_errors_total", log_dir=a, source=source, reason="refused")] == 1  # once
        assert s[key("mps_log_read_errors_total", log_dir=a, source=source, reason="undecodable")] == 0
    assert s[key("mps_log_lines_total", log_dir=b, source="control")] == 1
    assert s[key("mps_log_read_errors_total", log_dir=b, source="control", reason="refused")] == 0
    assert s[key("mps_log_lines_total", log_dir=b, source="server")] == 0
    assert s[key("mps_log_read_errors_total", log_dir=b, source="server", reason="refused")] == 1
    assert not [labels for _, labels in s if ("log_dir", c) in labels]  # not watched at all
    events = [json.loads(text) for text in log.read_text().splitlines() if text.startswith("{")]
    refused = {(e.get("path"), e.get("log_dir")) for e in events if e["event"] in ("log_file_refused", "log_dir_refused")}
    assert refused == {(f"{a}/control.log", None), (f"{a}/server.log", None), (f"{b}/server.log", None), (None, c)}
    report = subprocess.run(mpswatch_cmd("status", "--json", *args, nvml="no_driver"), env=agent_env(),
                            capture_output=True, text=True, timeout=60)
    notes = json.loads(report.stdout)["notes"]
    assert any(note.startswith(f"not watching {c}, the CUDA_MPS_LOG_DIRECTORY of nvidia-cuda-mps-control pid ")
               and f"runs as uid {NOBODY}, and the dir is owned by uid 0" in note for note in notes), notes


# ---------------------------------------------------------------- finding 9: what an unprivileged agent cannot see


@pytest.mark.usefixtures("as_root")
def test_an_agent_run_as_nobody_counts_the_root_daemon_whose_environment_it_cannot_read(processes, tmp_path):
    daemon = stand_in("nvidia-cuda-mps-control", "-d", env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    processes.append(daemon)
    with NobodyAgent([daemon.pid], ["--mps-control-bin", FAKE_CONTROL], env=FAST) as agent:
        unreadable = key("mps_discovery_unreadable_processes", kind="mps_control_daemon", reason="permission")
        engines_unreadable = key("mps_discovery_unreadable_processes", kind="engine", reason="permission")
        # (the first cycles may see the stand-in before its exec, not yet a daemon; the engines collector
        # publishes its count apart from mps_control's, and on a busy machine may not have yet)
        s = agent.wait_for(lambda s: s if s.get(unreadable) == 1 and engines_unreadable in s else None, timeout=15)
        assert s[engines_unreadable] == 0
        assert s[key("mps_control_daemons")] == 0
    report = subprocess.run([sys.executable, "-m", "tests.kit.nobody", str(daemon.pid), "status", "--json",
                             "--mps-control-bin", FAKE_CONTROL], env=agent_env(), capture_output=True, text=True,
                            timeout=60)
    notes = json.loads(report.stdout)["notes"]
    assert any(note.startswith(f"cannot read the environment of nvidia-cuda-mps-control pid {daemon.pid} ")
               for note in notes), notes


# ---------------------------------------------------------------- the rules, as any user


def test_a_follower_reads_only_regular_files_never_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("a line\n")
    (tmp_path / "link.log").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("link.log", "fifo.log"):
        follower = LogFollower(str(tmp_path / name), backfill_bytes=1 << 20)
        assert follower.poll() == [] and follower.poll() == []
        assert follower.stats.problems["refused"] == 1 and follower.stats.lines == 0  # counted once
        assert follower.refusal in ("a symbolic link (never followed)", "not a regular file")
    replaced = tmp_path / "control.log"
    replaced.write_text("first\n")
    follower = LogFollower(str(replaced), backfill_bytes=1 << 20)
    assert follower.poll() == ["first"]
    replaced.unlink()
    replaced.symlink_to(target)  # the file swapped for a link: what was read stays, the link is not followed
    assert follower.poll() == [] and follower.stats.problems["refused"] == 1


def test_in_a_daemon_s_dir_a_follower_reads_only_its_user_s_files_with_one_link(tmp_path):
    me = os.getuid()
    log = tmp_path / "server.log"
    log.write_text("mine\n")
    assert LogFollower(str(log), 1 << 20, owners=frozenset({me})).poll() == ["mine"]
    other = LogFollower(str(log), 1 << 20, owners=frozenset({me + 1}))
    assert other.poll() == [] and other.refusal == f"owned by uid {me}, not by the daemon's user (uid {me + 1})"
    os.link(log, tmp_path / "control.log")
    linked = LogFollower(str(tmp_path / "control.log"), 1 << 20, owners=frozenset({me}))
    assert linked.poll() == [] and linked.refusal == "has 2 hard links (another file's name)"
    assert LogFollower(str(tmp_path / "control.log"), 1 << 20).poll() == ["mine"]  # a configured or default dir


def fake_daemon_proc(proc: Path, pid: int, uid: int, pipe_dir: Path) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"nvidia-cuda-mps-control\0-d\0")
    (d / "status").write_text(f"Name:\tnvidia-cuda-mps\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "environ").write_bytes(f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}\0".encode())


def test_a_daemon_s_dir_is_trusted_when_the_daemon_runs_as_root_or_owns_it(tmp_path):
    owner = os.stat(tmp_path).st_uid
    other = owner + 1 if owner + 1 != 0 else owner + 2
    own, foreign, roots = tmp_path / "own", tmp_path / "foreign", tmp_path / "roots"
    for d in (own, foreign, roots):
        d.mkdir()
    fake_daemon_proc(tmp_path / "proc", 10, owner, own)
    fake_daemon_proc(tmp_path / "proc", 11, other, foreign)  # someone else's dir
    fake_daemon_proc(tmp_path / "proc", 12, 0, roots)
    settings = DiscoverySettings(default_pipe_dirs=(), device_plugin_root=str(tmp_path / "k"))
    discovered = discover_pipe_dirs(settings, ProcFS(tmp_path / "proc"))
    assert dict(discovered.dirs) == {str(own): "process", str(roots): "process"}
    assert discovered.owners == {str(own): frozenset({owner}), str(roots): frozenset({0})}  # whose files are read
    assert discovered.refused == {
        str(foreign): f"nvidia-cuda-mps-control pid 11 runs as uid {other}, and the dir is owned by uid {owner}"}
    assert any(note.startswith(f"not watching {foreign}, the CUDA_MPS_PIPE_DIRECTORY of nvidia-cuda-mps-control pid 11")
               for note in discovered.notes)
