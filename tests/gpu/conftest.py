"""Real MPS on a real GPU: each test starts its own control daemon in a temporary directory
(tests.kit.realmps) and always stops it, its servers and its clients. GPU settings are never touched.
Skipped where there is no GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.gpu.results import MATRIX
from tests.kit.realmps import MpsDaemon

HERE = Path(__file__).resolve().parent


def _gpu_present() -> bool:
    if not shutil.which("nvidia-cuda-mps-control") or not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with nvidia-cuda-mps-control")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def mps(tmp_path):
    daemon = MpsDaemon(tmp_path / "mps")
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def mps_client(tmp_path_factory):
    """tests/gpu/mps_client.cu, built with nvcc: a light client to start by the dozen, or to fault."""
    binary = tmp_path_factory.mktemp("bin") / "mps_client"
    subprocess.run(["nvcc", "-O2", "-o", str(binary), str(HERE / "mps_client.cu")], check=True, timeout=300)
    return str(binary)


@pytest.fixture(autouse=True)
def _save_matrix():
    """After every test, so that a run killed from outside keeps the rows so far."""
    yield
    path = os.environ.get("MPSWATCH_GPU_MATRIX_RESULTS")
    if path and MATRIX.cases:
        gpu = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        MATRIX.save(path, {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "command": "python3 -m pytest -v tests/gpu"})
