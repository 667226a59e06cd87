"""Issue 19: can a control daemon's liveness be told without a command (which control.log records with
its reply)? Connects to the daemon's control socket, sends nothing, half-closes, and waits for the
daemon to close its end: a daemon that answers accepts and drops the connection at once; a stopped
(SIGSTOPped) one never does. Prints the time to EOF and the bytes each probe adds to control.log,
beside those of `get_server_list`, for a real daemon started in a temporary pipe dir (always quit).

    python -m benchmarks.bare_connect_probe --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def bare_probe(control: Path, timeout: float) -> float | None:
    """Seconds until the daemon closed a connection that sent nothing; None: it did not within timeout."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:  # as the daemon's socket is
        sock.settimeout(timeout)
        sock.connect(str(control))
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return None
    return time.monotonic() - started


def grown(log: Path, action) -> tuple[int, object, str]:
    before = log.stat().st_size
    result = action()
    time.sleep(0.3)
    text = log.read_bytes()[before:].decode(errors="replace")
    return len(text.encode()), result, text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bare-probe-"))
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    (root / "pipe").mkdir()
    (root / "log").mkdir()
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=30)
    log, control = root / "log" / "control.log", root / "pipe" / "control"
    out: dict = {}
    try:
        time.sleep(1.0)
        pid = int((root / "pipe" / "nvidia-cuda-mps-control.pid").read_text())
        command = lambda: subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", env=env,  # noqa: E731
                                         capture_output=True, text=True, timeout=10).returncode
        out["command"] = dict(zip(("bytes", "returncode", "lines"), grown(log, command)))
        out["bare"] = [dict(zip(("bytes", "seconds", "lines"), grown(log, lambda: bare_probe(control, 3.0)))) for _ in range(3)]
        os.kill(pid, signal.SIGSTOP)
        try:
            out["bare_stopped"] = {"seconds": bare_probe(control, 3.0)}
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)
        out["bare_after_cont"] = dict(zip(("bytes", "seconds", "lines"), grown(log, lambda: bare_probe(control, 3.0))))
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
