"""An HTTP server (on loopback unless told otherwise) that serves vLLM-named /metrics
(tests/fixtures/vllm) with token counters that advance on every request; it can also be slow, send
garbage or a huge body.

As a script it runs as its own process with a vLLM-like command line, so that discovery finds it
(`command` builds that line, `wait_ready` waits for the server):
    python tests/kit/fakevllm.py vllm serve MODEL [--port PORT] [--host HOST] [--served-model-name NAME]
                                 [--tokens N] [--full-size-body] [--spin-file PATH] [--latencies]
or with another kind's command line, serving that kind's body (tests/fixtures/engines; `command(kind=...)`):
    python tests/kit/fakevllm.py -m sglang.launch_server --model-path MODEL [--port PORT]
    python <a link named llama-server to this script> -m MODEL [--port PORT] --metrics
(--port 8000 as vLLM's default; --host 127.0.0.1, unlike vLLM's all addresses, so that a test on a
shared machine serves nothing beyond it unless it asks, as a test inside a network namespace does.)

Two bodies: the tests' hand-written one (tests/fixtures/vllm/metrics-v0.10-names.txt, 24 samples),
and a full-size one (full_size_body), synthetic: every family vLLM v1 (about v0.10) exports on
/metrics with its buckets, plus prometheus_client's process/python families and
prometheus_fastapi_instrumentator's http families (shared/reference/anchors-notes.md §3), one engine,
one model. Not a recording: vLLM cannot run on this project's machines.

With latencies (`--latencies`, or FakeVllm(latencies=...)), the body's latency histograms advance
in a controlled way: every body served adds the same observations (LATENCY_OBSERVATIONS) to each,
so between any two bodies a histogram's increase is a whole multiple of one set, and its quantiles
and mean over any window are those of one set, whoever else scraped in between.

Standard library only: the script runs without the repository on its path.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vllm"
ENGINE_FIXTURES = FIXTURES.parent / "engines"
KIND_BODIES = {"sglang": ENGINE_FIXTURES / "sglang-0.5.6-tp2.txt", "llamacpp": ENGINE_FIXTURES / "llamacpp-b5600.txt"}
FULL_SIZE_LABELS = 'engine="0",model_name="Qwen/Qwen2.5-1.5B-Instruct"'
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
ONE_TWO_FIVE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]  # up to max_model_len 32768
HISTOGRAMS = {
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "vllm:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                                         7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:request_time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                                                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_prompt_tokens": ONE_TWO_FIVE,
    "vllm:request_generation_tokens": ONE_TWO_FIVE,
    "vllm:request_max_num_generation_tokens": ONE_TWO_FIVE,
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    "vllm:request_params_max_tokens": ONE_TWO_FIVE,
}
# observations (seconds) added to each latency histogram by every body served with latencies; chosen
# so that each set's p50 and p99 fall inside buckets of the layouts above (tests/test_engine_latency.py
# works them out by hand)
LATENCY_OBSERVATIONS = {
    "vllm:time_to_first_token_seconds": [0.03] * 4 + [0.05] * 4 + [0.3] * 2,
    "vllm:inter_token_latency_seconds": [0.02] * 8 + [0.09] * 2,
    "vllm:request_queue_time_seconds": [0.1] * 3 + [1.2],
    "vllm:e2e_request_latency_seconds": [2.2] * 2 + [4.0] * 2,
}
HANDLERS = ("/v1/chat/completions", "/v1/completions", "/metrics", "/health")
HTTP_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5, 10, 30, 60]


def full_size_body(template: bool = False) -> str:
    """`template`: with FakeVllm's placeholders for the values it fills in on each request."""
    out: list[str] = []
    running, waiting, kv, prompt, generation = (
        ("{running}", "{waiting}", "{kv}", "{prompt}", "{generation}") if template else (3.0, 1.0, 0.42, 750.0, 250.0))

    def family(name: str, kind: str, samples: list[tuple[str, str, object]]) -> None:
        out.append(f"# HELP {name} {name.split(':')[-1].replace('_', ' ')}.")
        out.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            out.append(f"{sample}{{{labels}}} {value}" if labels else f"{sample} {value}")

    def histogram(name: str, buckets: list[float], labels: str = FULL_SIZE_LABELS) -> None:
        samples = [(f"{name}_bucket", f'{labels},le="{float(b)}"', float(i * 7)) for i, b in enumerate(buckets)]
        samples += [(f"{name}_bucket", f'{labels},le="+Inf"', float(len(buckets) * 7)),
                    (f"{name}_count", labels, float(len(buckets) * 7)), (f"{name}_sum", labels, 1234.5),
                    (f"{name}_created", labels, 1.7e9)]
        family(name, "histogram", samples)

    def counter(name: str, labels: str = FULL_SIZE_LABELS, value: object = 1000.0) -> None:
        family(f"{name}_total", "counter", [(f"{name}_total", labels, value), (f"{name}_created", labels, 1.7e9)])

    for gen in range(3):
        out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {1000.0 * gen}')
    family("python_info", "gauge", [("python_info", 'implementation="CPython",major="3",minor="12"', 1.0)])
    for name in ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_cpu_seconds_total", "process_open_fds", "process_max_fds"):
        family(name, "gauge", [(name, "", 12345.0)])
    for handler in HANDLERS:
        for status in ("2xx", "4xx"):
            out.append(f'http_requests_total{{handler="{handler}",method="POST",status="{status}"}} 500.0')
    for name in ("http_request_size_bytes", "http_response_size_bytes"):
        for handler in HANDLERS:
            labels = f'handler="{handler}"'
            family(name, "summary", [(f"{name}_count", labels, 500.0), (f"{name}_sum", labels, 9e5),
                                     (f"{name}_created", labels, 1.7e9)])
    histogram("http_request_duration_highr_seconds", HTTP_BUCKETS, labels='method="POST"')
    for handler in HANDLERS:
        histogram("http_request_duration_seconds", [0.1, 0.5, 1.0], labels=f'handler="{handler}",method="POST"')
    family("vllm:num_requests_running", "gauge", [("vllm:num_requests_running", FULL_SIZE_LABELS, running)])
    family("vllm:num_requests_waiting", "gauge", [("vllm:num_requests_waiting", FULL_SIZE_LABELS, waiting)])
    family("vllm:kv_cache_usage_perc", "gauge", [("vllm:kv_cache_usage_perc", FULL_SIZE_LABELS, kv)])
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions"):
        counter(name)
    counter("vllm:prompt_tokens", value=prompt)
    counter("vllm:generation_tokens", value=generation)
    family("vllm:request_success_total", "counter",
           [("vllm:request_success_total", f'{FULL_SIZE_LABELS},finished_reason="{r}"', 10.0)
            for r in ("stop", "length", "abort")])
    for name, buckets in HISTOGRAMS.items():
        histogram(name, buckets)
    family("vllm:cache_config_info", "gauge",
           [("vllm:cache_config_info", 'block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
                                       'gpu_memory_utilization="0.45",num_gpu_blocks="31542"', 1.0)])
    return "\n".join(out) + "\n"


class FakeVllm:
    def __init__(self, body: str = "metrics-v0.10-names.txt", tokens_per_request: float = 100.0,
                 port: int = 0, mode: str = "ok", model_label: str | None = None, host: str = "127.0.0.1",
                 full_size: bool = False, basic_auth: tuple[str, str] | None = None,
                 latencies: dict[str, list[float]] | None = None) -> None:
        self.template = full_size_body(template=True) if full_size else (FIXTURES / body).read_text()
        self.latencies = latencies or {}
        if self.latencies:  # the body's own lines of these histograms give way to the advancing ones
            self.template = "".join(line for line in self.template.splitlines(keepends=True)
                                    if _family_of(line) not in self.latencies)
        self.model_label = model_label or "Qwen/Qwen2.5-1.5B-Instruct"
        if model_label:  # vLLM labels its metrics with the served model name, when one is given
            self.template = self.template.replace('model_name="Qwen/Qwen2.5-1.5B-Instruct"', f'model_name="{model_label}"')
        self.tokens_per_request = tokens_per_request
        self.mode = mode  # ok | slow | trickle | garbage | huge
        self.requests = 0
        # with basic_auth (user, password): 401 to a request without them, as a proxy in front of vLLM
        self.authorization = None if basic_auth is None else "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
        self.refused = 0
        self.running, self.waiting = 3, 1
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if fake.authorization is not None and self.headers.get("Authorization") != fake.authorization:
                    fake.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="vllm"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
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
            served = self.requests
        return (self.template.replace("{running}", f"{self.running}.0").replace("{waiting}", f"{self.waiting}.0")
                .replace("{kv}", "0.42").replace("{prompt}", f"{tokens * 0.75:.1f}")
                .replace("{generation}", f"{tokens * 0.25:.1f}") + self._latency_histograms(served))

    def _latency_histograms(self, served: int) -> str:
        """Each histogram with `served` times its observations (LATENCY_OBSERVATIONS' shape)."""
        out = []
        labels = f'engine="0",model_name="{self.model_label}"'
        for name, observations in self.latencies.items():
            out += [f"# HELP {name} {name.split(':')[-1].replace('_', ' ')}.", f"# TYPE {name} histogram"]
            for bound in [*map(float, HISTOGRAMS[name]), float("inf")]:
                below = served * sum(1 for seconds in observations if seconds <= bound)
                le = "+Inf" if bound == float("inf") else str(bound)
                out.append(f'{name}_bucket{{{labels},le="{le}"}} {float(below)}')
            out.append(f"{name}_count{{{labels}}} {float(served * len(observations))}")
            out.append(f"{name}_sum{{{labels}}} {served * sum(observations)!r}")
        return "\n".join(out) + "\n" if out else ""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()



class PacedVllm(FakeVllm):
    """A fake vLLM whose counters advance with time at rates the test sets (`pace`): generated tokens
    at `tokens_per_second`, each observed at `inter_token_seconds` in vllm:inter_token_latency_seconds
    (an engine decoding steadily), and prompt tokens at `prompt_tokens_per_second` (a prefill burst)."""

    ITL = "vllm:inter_token_latency_seconds"

    def __init__(self, **kwargs) -> None:
        super().__init__(latencies={self.ITL: [0.0]}, **kwargs)  # the template's own ITL lines give way
        self.inter_token_seconds, self.tokens_per_second, self.prompt_tokens_per_second = 0.01, 100.0, 0.0
        self._at = time.monotonic()
        self._prompt = self._generated = self._itl_sum = 0.0
        self._itl_buckets = [0.0] * (len(HISTOGRAMS[self.ITL]) + 1)  # the last: +Inf

    def pace(self, **rates: float) -> None:
        """Sets inter_token_seconds, tokens_per_second, prompt_tokens_per_second, running (from now on)."""
        with self._lock:
            self._advance()
            for name, value in rates.items():
                if not hasattr(self, name):
                    raise AttributeError(name)
                setattr(self, name, value)

    def _advance(self) -> None:
        now = time.monotonic()
        elapsed, self._at = now - self._at, now
        tokens = self.tokens_per_second * elapsed
        self._prompt += self.prompt_tokens_per_second * elapsed
        self._generated += tokens
        self._itl_sum += tokens * self.inter_token_seconds
        for i, bound in enumerate([*HISTOGRAMS[self.ITL], float("inf")]):
            if self.inter_token_seconds <= bound:
                self._itl_buckets[i] += tokens

    def body(self) -> str:
        with self._lock:
            self._advance()
            labels = f'engine="0",model_name="{self.model_label}"'
            lines = [f"# HELP {self.ITL} Histogram of inter-token latency in seconds.", f"# TYPE {self.ITL} histogram"]
            for bound, below in zip([*HISTOGRAMS[self.ITL], "+Inf"], self._itl_buckets, strict=True):
                lines.append(f'{self.ITL}_bucket{{{labels},le="{bound}"}} {below!r}')
            lines += [f"{self.ITL}_count{{{labels}}} {self._generated!r}", f"{self.ITL}_sum{{{labels}}} {self._itl_sum!r}"]
            return (self.template.replace("{running}", f"{self.running}.0").replace("{waiting}", "0.0")
                    .replace("{kv}", "0.42").replace("{prompt}", f"{self._prompt:.1f}")
                    .replace("{generation}", f"{self._generated:.1f}") + "\n".join(lines) + "\n")


def _family_of(line: str) -> str:
    """The histogram family a line of a body belongs to (its name without _bucket, _sum, _count, _created)."""
    words = line.split()
    name = (words[2] if len(words) > 2 else "") if line.startswith("#") else (words[0].split("{", 1)[0] if words else "")
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def command(port: int | None, served_model_name: str | None = None, *options: str,
            model: str = "Qwen/Qwen2.5-1.5B-Instruct", kind: str = "vllm", link_dir: Path | None = None) -> list[str]:
    """The command line of a fake engine process, run by this interpreter; `port` None: vLLM's
    default, as an engine started without --port. `kind` sglang or llamacpp: that engine's command
    line (llamacpp: through a link named llama-server made in `link_dir`)."""
    at_port = ["--port", str(port)] if port is not None else []
    script = str(Path(__file__).resolve())
    if kind == "sglang":
        return [sys.executable, script, "-m", "sglang.launch_server", "--model-path", model, *at_port, *options]
    if kind == "llamacpp":
        if link_dir is None:
            raise ValueError("a llama-server command line needs a link_dir for its link")
        link = link_dir / "llama-server"
        if not link.exists():
            link.symlink_to(script)
        return [sys.executable, str(link), "-m", model, *at_port, "--metrics", *options]
    named = ["--served-model-name", served_model_name] if served_model_name else []
    return [sys.executable, script, "vllm", "serve", model, *at_port, *named, *options]


def wait_ready(process: subprocess.Popen) -> subprocess.Popen:
    """Once the engine started with stdout=PIPE, text=True serves; returns it."""
    line = process.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"fake engine {process.args} did not start: {line!r}")
    return process


def serve_kind(kind: str, argv: list[str]) -> None:
    """Another kind's engine: its fixture body, on the port its command line gives."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args, _ = parser.parse_known_args(argv)
    FakeVllm(body=str(KIND_BODIES[kind]), port=args.port)
    print("ready", flush=True)
    while True:
        time.sleep(1.0)


def main(argv: list[str]) -> None:
    if "sglang.launch_server" in argv:
        serve_kind("sglang", argv)
    if Path(sys.argv[0]).name == "llama-server":
        serve_kind("llamacpp", argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("vllm")
    parser.add_argument("serve")
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name")
    parser.add_argument("--tokens", type=float, default=100.0)
    parser.add_argument("--spin-file", help="keep one thread busy on a core while this file exists")
    parser.add_argument("--full-size-body", action="store_true", help="serve full_size_body instead of the tests' body")
    parser.add_argument("--latencies", action="store_true", help="latency histograms that advance (LATENCY_OBSERVATIONS)")
    args = parser.parse_args(argv)
    FakeVllm(port=args.port, tokens_per_request=args.tokens, model_label=args.served_model_name or args.model,
             host=args.host, full_size=args.full_size_body, latencies=LATENCY_OBSERVATIONS if args.latencies else None)
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
