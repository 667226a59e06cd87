"""The shipped alert rules evaluated by promtool on recordings of what the agent exported: first on
a recording made here (fixture daemon), then on the fault matrix's recordings from the H200
(tests/fixtures/h200-matrix/*.json.gz, written by tests/gpu on the GPU machine)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.kit.agentproc import Agent
from tests.kit.fakedaemon import FAKE_CONTROL
from tests.kit.matrix import Matrix, load_run, promtool_test

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "mpswatch.rules.yml"
H200_MATRIX = sorted((REPO / "tests" / "fixtures" / "h200-matrix").glob("*.json.gz"))

pytestmark = pytest.mark.skipif(not shutil.which("promtool"), reason="needs promtool (Debian package prometheus)")


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}


def promtool(case: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    test_file = tmp_path / f"{case['name'].replace(' ', '_').replace('/', '_')}.test.yml"
    test_file.write_text(yaml.safe_dump(promtool_test(case, str(RULES), alert_exprs()), width=1 << 20))
    return subprocess.run(["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)


def recorded_hang(fake_daemon, tmp_path) -> dict:
    daemon = fake_daemon("healthy_two_clients_driver580")
    args = ["--mps-control-bin", FAKE_CONTROL, "--interval", "1", "--command-timeout", "1", "--pipe-dir", daemon.path]
    case = Matrix().case("fixture daemon hung", "the fixture control program stops answering")
    with Agent(args, log_path=tmp_path / "agent.log") as agent:
        case.record(agent)
        up = ("mps_control_up", frozenset({("pipe_dir", daemon.path)}))
        agent.wait_for(lambda s: s.get(up) == 1)
        time.sleep(2)
        case.expect_quiet("MPSControlDaemonUnresponsive")
        daemon.update(mode="hang")
        agent.wait_for(lambda s: s.get(up) == 0, timeout=10)
        time.sleep(1.5)
        case.expect_alert("MPSControlDaemonUnresponsive")
        case.finish_recording()
    return case.as_dict()


def test_a_recorded_hang_satisfies_the_unresponsive_alert_and_nothing_before_it(fake_daemon, tmp_path):
    case = recorded_hang(fake_daemon, tmp_path)
    checked = promtool(case, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_check_fails_when_an_alert_is_expected_that_the_recording_does_not_support(fake_daemon, tmp_path):
    case = recorded_hang(fake_daemon, tmp_path)
    case["alerts"] = [["MPSServerFault", case["alerts"][0][1]]]  # the fixture's server never faults
    checked = promtool(case, tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "FAILED" in checked.stdout + checked.stderr and "mps_server_status" in checked.stdout + checked.stderr


@pytest.mark.skipif(not H200_MATRIX, reason="no H200 matrix recording committed yet")
@pytest.mark.parametrize("path", H200_MATRIX, ids=[p.name.removesuffix(".json.gz") for p in H200_MATRIX])
def test_h200_matrix_cases_raise_the_alerts_they_should(path, tmp_path):
    run = load_run(path)
    checked_cases = [c for c in run["cases"] if c.get("recording") and (c["alerts"] or c["quiet"])]
    assert checked_cases
    for case in checked_cases:
        checked = promtool(case, tmp_path)
        assert checked.returncode == 0, f"{case['name']}: {checked.stdout}{checked.stderr}"
