"""Hostile engines: loopback HTTP servers that answer /metrics the way a broken or malicious engine
would, each kind on a port of its own, written on raw sockets so that every byte is the server's choice.

As a script it runs them in a process of their own (so that their memory is not the agent's) and prints
one JSON line, {"kind-n": url, ...}, once they listen:
    python tests/kit/hostileengines.py [--copies N] [KIND ...]      (default: every kind, 2 copies each)

Standard library only: the script runs without the repository on its path.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections.abc import Callable

GOOD_BODY = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="m"} 3.0\n'
    "# TYPE vllm:prompt_tokens counter\n"
    'vllm:prompt_tokens_total{model_name="m"} 100.0\n'
)
ONE_GIB = 1 << 30


def _make_gzip_bomb() -> bytes:
    """1 GiB of zeros, gzipped (about 1 MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(packer.compress(zeros) for _ in range(ONE_GIB >> 20)), packer.flush()])


_BOMB: list[bytes] = []
_BOMB_LOCK = threading.Lock()


def gzip_bomb() -> bytes:
    with _BOMB_LOCK:
        if not _BOMB:
            _BOMB.append(_make_gzip_bomb())
        return _BOMB[0]


def _headers(status: str = "200 OK", *extra: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", "Content-Type: text/plain; version=0.0.4", "Connection: close",
                         *extra]) + "\r\n\r\n").encode()


def _silent(sock: socket.socket) -> None:
    time.sleep(3600)  # reads the request, never answers


def _trickle_headers(sock: socket.socket) -> None:
    for byte in _headers() * 1000:  # a byte a second, never done
        sock.sendall(bytes([byte]))
        time.sleep(1.0)


def _trickle_body(sock: socket.socket) -> None:
    sock.sendall(_headers())
    while True:
        sock.sendall(b"#")
        time.sleep(1.0)


def _huge(sock: socket.socket) -> None:
    sock.sendall(_headers("200 OK", f"Content-Length: {ONE_GIB}"))
    line = b"# padding " + b"x" * 1013 + b"\n"
    block = line * 64
    for _ in range(ONE_GIB // len(block)):
        sock.sendall(block)


def _endless_chunked(sock: socket.socket) -> None:
    sock.sendall(_headers("200 OK", "Transfer-Encoding: chunked"))
    chunk = b"# " + b"y" * 4093 + b"\n"
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    while True:
        sock.sendall(framed)


def _gzip_bomb(sock: socket.socket) -> None:
    bomb = gzip_bomb()
    sock.sendall(_headers("200 OK", "Content-Encoding: gzip", f"Content-Length: {len(bomb)}"))
    sock.sendall(bomb)


def _redirect(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    sock.sendall(_headers("302 Found", f"Location: http://127.0.0.1:{port}/metrics", "Content-Length: 0"))


def _huge_headers(sock: socket.socket) -> None:
    sock.sendall(b"HTTP/1.1 200 OK\r\n")
    value = b"z" * 65000
    for n in range(100000):  # far more than any client takes
        sock.sendall(b"X-Padding-%d: " % n + value + b"\r\n")


def _bad_values(sock: socket.socket) -> None:
    body = (
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{model_name="m"} NaN\n'
        b"# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{model_name="m"} -4.0\n'
        b"# TYPE vllm:kv_cache_usage_perc gauge\n"
        b'vllm:kv_cache_usage_perc{model_name="m"} +Inf\n'
        b"# TYPE vllm:prompt_tokens counter\n"
        b'vllm:prompt_tokens_total{model_name="m"} 3.0\n'
        b"# TYPE vllm:prompt_tokens counter\n"
        b'vllm:prompt_tokens_total{model_name="m"} 3.0\n'
    )
    sock.sendall(_headers("200 OK", f"Content-Length: {len(body)}") + body)


def _good(sock: socket.socket) -> None:
    body = GOOD_BODY.encode()
    sock.sendall(_headers("200 OK", f"Content-Length: {len(body)}") + body)


KINDS: dict[str, Callable[[socket.socket], None]] = {
    "silent": _silent,
    "trickle_headers": _trickle_headers,
    "trickle_body": _trickle_body,
    "huge": _huge,
    "endless_chunked": _endless_chunked,
    "gzip_bomb": _gzip_bomb,
    "redirect": _redirect,
    "huge_headers": _huge_headers,
    "bad_values": _bad_values,
}


class HostileEngine:
    """One kind on a loopback port; `good` answers a small valid vLLM body (a control)."""

    def __init__(self, kind: str) -> None:
        answer = _good if kind == "good" else KINDS[kind]

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                try:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = sock.recv(65536)
                        if not data:
                            return
                        request += data
                    answer(sock)
                except OSError:
                    pass  # the client hung up: what a client that protects itself does

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.kind = kind
        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kinds", nargs="*", help=f"of {', '.join(KINDS)}, good (default: every hostile kind)")
    parser.add_argument("--copies", type=int, default=2)
    args = parser.parse_args(argv)
    args.kinds = args.kinds or list(KINDS)
    if set(args.kinds) - {*KINDS, "good"}:
        parser.error(f"no such kinds: {sorted(set(args.kinds) - {*KINDS, 'good'})}")
    if "gzip_bomb" in args.kinds:
        gzip_bomb()  # made before listening: the first request must not wait for it
    engines = [HostileEngine(kind) for kind in args.kinds for _ in range(args.copies)]
    names: dict[str, int] = {}
    urls = {}
    for engine in engines:
        names[engine.kind] = names.get(engine.kind, 0) + 1
        urls[f"{engine.kind.replace('_', '-')}-{names[engine.kind]}"] = engine.url
    print(json.dumps(urls), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
