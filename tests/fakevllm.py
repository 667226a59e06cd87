"""An HTTP server (on loopback unless told otherwise) that serves vLLM-named /metrics
(tests/fixtures/vllm) with token counters that advance on every request; it can also be slow, send
garbage or a huge body.

As a script it runs as its own process with a vLLM-like command line, so that discovery finds it:
    python tests/fakevllm.py vllm serve MODEL [--port PORT] [--host HOST] [--served-model-name NAME] [--tokens N]
(--port 8000 as vLLM's default; --host 127.0.0.1, unlike vLLM's all addresses, so that a test on a
shared machine serves nothing beyond it unless it asks, as a test inside a network namespace does.)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vllm"


class FakeVllm:
    def __init__(self, body: str = "metrics-v0.10-names.txt", tokens_per_request: float = 100.0,
                 port: int = 0, mode: str = "ok", model_label: str | None = None, host: str = "127.0.0.1") -> None:
        self.template = (FIXTURES / body).read_text()
        if model_label:  # vLLM labels its metrics with the served model name, when one is given
            self.template = self.template.replace('model_name="Qwen/Qwen2.5-1.5B-Instruct"', f'model_name="{model_label}"')
        self.tokens_per_request = tokens_per_request
        self.mode = mode  # ok | slow | trickle | garbage | huge
        self.requests = 0
        self.running, self.waiting = 3, 1
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if fake.mode == "slow":
                    time.sleep(5)
                if fake.mode == "trickle":  # headers at once, then a byte every 0.1 s for 10 s
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"#")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if fake.mode == "huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    chunk = b"# padding " + b"x" * 1014 + b"\n"
                    try:
                        for _ in range(50 * 1024):  # 50 MiB
                            self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                body = fake.body().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # the agent hanging up on a huge or slow answer is the point

        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def body(self) -> str:
        if self.mode == "garbage":
            return "<html><body>502 Bad Gateway</body></html>\n"
        with self._lock:
            self.requests += 1
            tokens = self.requests * self.tokens_per_request
        return (self.template.replace("{running}", f"{self.running}.0").replace("{waiting}", f"{self.waiting}.0")
                .replace("{kv}", "0.42").replace("{prompt}", f"{tokens * 0.75:.1f}")
                .replace("{generation}", f"{tokens * 0.25:.1f}"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("vllm")
    parser.add_argument("serve")
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name")
    parser.add_argument("--tokens", type=float, default=100.0)
    parser.add_argument("--spin-file", help="keep one thread busy on a core while this file exists")
    args = parser.parse_args(argv)
    FakeVllm(port=args.port, tokens_per_request=args.tokens, model_label=args.served_model_name or args.model,
             host=args.host)
    print("ready", flush=True)
    while True:
        if args.spin_file and Path(args.spin_file).exists():
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                pass
        else:
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1:])
