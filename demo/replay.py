"""`make demo`: mpswatch, Prometheus and Alertmanager on loopback, watching a REPLAY.

No GPU is needed: the MPS control daemon's answers are replayed from real H200 captures
(tests/scenarios, tests/fixtures/h200-driver580), NVML from a real H200 recording
(tests/fakenvml.py), and one vLLM-like engine is a small HTTP server (tests/fakevllm.py).
The timeline: healthy; then the control daemon is killed (its pid file stays, as after `kill -9`),
MPSControlDaemonDown fires after a minute and reaches the "pager"; then the daemon is back and the
alert resolves. Every delivery Alertmanager makes is printed here.

    make demo                      # or: .venv/bin/python demo/replay.py [--down-after 30] [--down-for 90]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent")]

import yaml  # noqa: E402

from tests.agentproc import Agent, free_port  # noqa: E402
from tests.fakedaemon import FAKE_CONTROL, FakeDaemon  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Pager(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        for alert in body["alerts"]:
            labels = alert["labels"]
            say(f"ALERTMANAGER -> {self.path.strip('/')}: {alert['status'].upper()} {labels['alertname']} "
                f"({labels.get('severity')}): {alert['annotations'].get('summary', '')}")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down-after", type=float, default=30.0, help="seconds of health before the daemon dies")
    parser.add_argument("--down-for", type=float, default=90.0, help="seconds the daemon stays dead")
    parser.add_argument("--keep", type=float, default=60.0, help="seconds to keep running after recovery")
    args = parser.parse_args()
    prometheus, alertmanager = shutil.which("prometheus"), shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not (prometheus and alertmanager):
        print("needs Debian's prometheus and prometheus-alertmanager: apt-get install -y prometheus prometheus-alertmanager")
        return 2
    work = Path(tempfile.mkdtemp(prefix="mpswatch-demo-"))
    say("THIS IS A REPLAY: no GPU and no real MPS daemon; answers recorded on an NVIDIA H200 (driver 580).")
    say(f"working directory: {work}")
    daemon = FakeDaemon(work / "mps", "healthy_two_clients_driver580")
    log_dir = work / "log"
    log_dir.mkdir()
    (log_dir / "server.log").write_text((ROOT / "tests/fixtures/h200-driver580/session1-server.log").read_text())
    pager = ThreadingHTTPServer(("127.0.0.1", 0), Pager)
    threading.Thread(target=pager.serve_forever, daemon=True).start()
    engine = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/fakevllm.py"), "vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct",
         "--port", str(free_port()), "--served-model-name", "qwen-a"],
        env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": daemon.path}, stdout=subprocess.PIPE, text=True,
    )
    engine.stdout.readline()
    processes: list[subprocess.Popen] = [engine]
    agent = None
    try:
        agent = Agent(["--mps-control-bin", FAKE_CONTROL, "--pipe-dir", daemon.path, "--log-dir", str(log_dir)],
                      env={"MPSWATCH_GPU_NVML_MODULE": "tests.fakenvml:h200",
                           "FAKENVML_MPS_CLIENT_PIDS": str(engine.pid)},
                      log_path=work / "agent.log")
        am_config = yaml.safe_load((ROOT / "alerts/alertmanager.example.yml").read_text())
        for receiver in am_config["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = f"http://127.0.0.1:{pager.server_address[1]}/{receiver['name']}"
        am_config["route"].update(group_wait="5s", group_interval="10s")
        (work / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
        am_port, prom_port = free_port(), free_port()
        processes.append(subprocess.Popen(
            [alertmanager, f"--config.file={work / 'alertmanager.yml'}", f"--storage.path={work / 'am'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=open(work / "alertmanager.log", "wb")))
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
            "rule_files": [str(ROOT / "alerts/mpswatch.rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "mpswatch", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}],
        }))
        processes.append(subprocess.Popen(
            [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb")))
        say(f"mpswatch      {agent.url}/metrics   (mpswatch status --pipe-dir {daemon.path} --mps-control-bin {FAKE_CONTROL})")
        say(f"Prometheus    http://127.0.0.1:{prom_port}/alerts")
        say(f"Alertmanager  http://127.0.0.1:{am_port}/#/alerts")
        time.sleep(args.down_after)
        say("REPLAY: the MPS control daemon is killed (kill -9: its pid file stays). MPSControlDaemonDown fires after 1m.")
        daemon.kill()
        daemon.update(mode="not_running")
        time.sleep(args.down_for)
        say("REPLAY: the control daemon is back. The alert resolves.")
        daemon.update(mode="answer")
        time.sleep(args.keep)
        say("demo over")
    except KeyboardInterrupt:
        say("stopped")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if agent is not None:
            agent.stop()
        daemon.close()
        pager.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
