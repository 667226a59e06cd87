"""Engines on a real GPU: two synthetic vLLM-like engines under MPS (tests/gpu/synthetic_engine.py,
which stands in for vLLM), one at twice the other's token rate; then the control daemon dies and
one engine restarts without MPS.

Writes its figures as JSON to $MPSWATCH_GPU_ENGINE_RESULTS when set (docs/validation.md quotes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu.results import MATRIX, results_saver
from tests.kit.agentproc import Agent, agent_env, free_port, mpswatch_cmd

HERE = Path(__file__).resolve().parent
RESULTS: dict = {}


_save_results = results_saver("MPSWATCH_GPU_ENGINE_RESULTS", RESULTS)


def start_engine(mps, name: str, port: int, rate: float) -> subprocess.Popen:
    engine = subprocess.Popen(
        [sys.executable, str(HERE / "synthetic_engine.py"), "vllm", "serve", "synthetic/model", "--port", str(port),
         "--served-model-name", name, "--rate", str(rate)],
        env=mps.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = engine.stdout.readline()
    assert line.startswith("ready"), line + engine.stdout.read()
    return engine


def by_engine(samples, metric):
    return {dict(labels)["engine"]: v for (name, labels), v in samples.items() if name == metric}


def test_shares_attachment_and_an_engine_restarted_without_mps(mps, tmp_path):
    daemon_pid = mps.start()
    port_a, port_b = free_port(), free_port()
    engines = {"a": start_engine(mps, "engine-a", port_a, 2000), "b": start_engine(mps, "engine-b", port_b, 1000)}
    a, b = f"engine-a:{port_a}", f"engine-b:{port_b}"
    try:
        with Agent(["--pipe-dir", str(mps.pipe_dir), "--log-dir", str(mps.log_dir)], log_path=tmp_path / "agent.log") as agent:
            s = agent.wait_for(
                lambda s: s if len(by_engine(s, "mps_engine_load_share_ratio")) == 2
                and by_engine(s, "mps_engine_mps_attached") == {a: 1.0, b: 1.0} else None,
                timeout=40,
            )
            time.sleep(6)  # a few cycles at the steady rates
            s = agent.scrape()
            shares = by_engine(s, "mps_engine_load_share_ratio")
            imbalance = [v for (n, _), v in s.items() if n == "mps_gpu_engine_imbalance_ratio"]
            RESULTS["shares"] = shares
            RESULTS["imbalance"] = imbalance
            RESULTS["tokens_per_second"] = by_engine(s, "mps_engine_tokens_per_second")
            RESULTS["busiest_thread"] = by_engine(s, "mps_engine_busiest_thread_cpu_ratio")
            RESULTS["collector_seconds"] = [v for (n, l), v in s.items()
                                            if n == "mps_exporter_collector_duration_seconds" and dict(l)["collector"] == "engines"]
            assert shares[a] == pytest.approx(2 / 3, abs=0.08) and shares[b] == pytest.approx(1 / 3, abs=0.08)
            assert imbalance[0] == pytest.approx(4 / 3, abs=0.15)
            assert by_engine(s, "mps_engine_pipe_dir_served") == {a: 1.0, b: 1.0}

            case = MATRIX.case("an engine started while no control daemon runs",
                               "the control daemon is killed; engine-b is killed and started again with the same pipe dir")
            case.record(agent)
            case.expect_quiet("MPSEngineWithoutMPS")
            os.kill(daemon_pid, signal.SIGKILL)  # the control daemon dies; its server and clients stay
            engines["b"].kill()
            engines["b"].wait()
            engines["b"] = start_engine(mps, "engine-b", port_b, 1000)  # the engine restarts...
            restarted_at = time.monotonic()
            s = agent.wait_for(
                lambda s: s if by_engine(s, "mps_engine_mps_attached").get(b) == 0 else None, timeout=30,
            )  # ...and now runs alone, without MPS
            case.detect_seconds["mps_engine_mps_attached 0 (from the engine's ready line)"] = round(time.monotonic() - restarted_at, 3)
            case.expect_alert("MPSEngineWithoutMPS")
            RESULTS["after_restart"] = {
                "mps_engine_mps_attached": by_engine(s, "mps_engine_mps_attached"),
                "mps_engine_pipe_dir_served": by_engine(s, "mps_engine_pipe_dir_served"),
                "memory_by_kind": {f"{dict(l)['gpu_uuid']} {dict(l)['kind']}": v for (n, l), v in s.items()
                                   if n == "mps_gpu_memory_by_kind_bytes"},
            }
            RESULTS["after_restart"]["mps_processes"] = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
                capture_output=True, text=True).stdout
            assert by_engine(s, "mps_engine_pipe_dir_served").get(b) == 0
            case.expect_alert("MPSEnginePipeDirNotServed")
            case.reported.update(RESULTS["after_restart"])
            code_status = subprocess.run(mpswatch_cmd("status", "--json", "--pipe-dir", str(mps.pipe_dir), "--log-dir", str(mps.log_dir)), env=agent_env(),
                                         capture_output=True, text=True, timeout=60)
            case.status_verdict = json.loads(code_status.stdout)["verdict"]
            case.passed = True
            case.finish_recording()
    finally:
        for engine in engines.values():
            engine.kill()
            engine.wait()
        log = tmp_path / "agent.log"
        if log.exists():  # the agent's own account of the engines, kept even when an assertion failed
            RESULTS["agent_engine_log"] = [line for line in log.read_text().splitlines() if "engine" in line][-20:]
