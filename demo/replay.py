"""`make demo`: mpswatch, Prometheus and Alertmanager on loopback, watching a REPLAY.

No GPU is needed: the MPS control daemon's answers are replayed from real H200 captures
(tests/scenarios, tests/fixtures/h200-driver580), NVML from a real H200 recording
(tests/kit/fakenvml.py), and one vLLM-like engine is a small HTTP server (tests/kit/fakevllm.py).
The timeline: healthy; then the control daemon is killed (its pid file stays, as after `kill -9`),
MPSControlDaemonDown fires after a minute and reaches the "pager"; then the daemon is back and the
alert resolves. Every delivery Alertmanager makes is printed here.

    make demo                      # or: .venv/bin/python -m demo.replay [--down-after 30] [--down-for 90]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.kit.fakedaemon import FAKE_CONTROL
from tests.kit.replaystack import ALERTMANAGER, PROMETHEUS, ReplayStack


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
    if not (PROMETHEUS and ALERTMANAGER):
        print("needs Debian's prometheus and prometheus-alertmanager: apt-get install -y prometheus prometheus-alertmanager")
        return 2
    work = Path(tempfile.mkdtemp(prefix="mpswatch-demo-"))
    say("THIS IS A REPLAY: no GPU and no real MPS daemon; answers recorded on an NVIDIA H200 (driver 580).")
    say(f"working directory: {work}")
    pager = ThreadingHTTPServer(("127.0.0.1", 0), Pager)
    threading.Thread(target=pager.serve_forever, daemon=True).start()
    stack = None
    try:
        stack = ReplayStack(work, f"http://127.0.0.1:{pager.server_address[1]}", interval="5s",
                            agent_interval="2", alert_grouping=("5s", "10s"))
        say(f"mpswatch      {stack.agent.url}/metrics   "
            f"(mpswatch status --pipe-dir {stack.daemon.path} --mps-control-bin {FAKE_CONTROL})")
        say(f"Prometheus    {stack.prometheus}/alerts")
        say(f"Alertmanager  {stack.alertmanager}/#/alerts")
        time.sleep(args.down_after)
        say("REPLAY: the MPS control daemon is killed (kill -9: its pid file stays). MPSControlDaemonDown fires after 1m.")
        stack.kill_daemon()
        time.sleep(args.down_for)
        say("REPLAY: the control daemon is back. The alert resolves.")
        stack.restore_daemon()
        time.sleep(args.keep)
        say("demo over")
    except KeyboardInterrupt:
        say("stopped")
    finally:
        if stack is not None:
            stack.close()
        pager.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
