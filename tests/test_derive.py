"""The derive step's MPS joins: whether a daemon serves an engine's pipe dir (yes / no / unknown), and
whether MPS is expected on the node; and how both show in /metrics and `status`."""

from __future__ import annotations

import pytest
from mpswatch.analysis import health_report, render_text
from mpswatch.exposition import render
from mpswatch.snapshot import DaemonState, EnginesData, EngineState, MpsControlData, MpsDaemon, frozen_map

from tests.kit.snapshots import snapshot_of

PIPE = "/run/nvidia-mps"


def engine(pipe_dir: str | None = PIPE, pipe_dir_set: bool | None = True, name: str = "a:8001") -> EngineState:
    return EngineState(name, "http://127.0.0.1:8001/metrics", "discovered", True, pids=(10,),
                       mps_pipe_dir=pipe_dir, mps_pipe_dir_set=pipe_dir_set)


def control(*daemons: MpsDaemon, configured_only: bool = False, expected: str = "auto") -> MpsControlData:
    return MpsControlData(tuple(daemons), (PIPE,), configured_only=configured_only, expected=expected)


def daemon(state: DaemonState, pipe_dir: str = PIPE, reason: str = "why") -> MpsDaemon:
    return MpsDaemon(pipe_dir, "default", state, reason)


def joined(mps_control: MpsControlData | None, *engines: EngineState):
    data = {"engines": EnginesData(tuple(engines), frozen_map())}
    if mps_control is not None:
        data["mps_control"] = mps_control
    return snapshot_of(**data)


def families(snapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {m.name: [(s.labels, s.value) for s in m.samples] for m in render(snapshot, "test")}


def test_a_watched_daemon_that_answers_serves_its_pipe_dir():
    [e] = joined(control(daemon(DaemonState.UP)), engine()).derived.engines
    assert (e.pipe_dir_served, e.pipe_dir_served_detail) == (True, "served: its control daemon answers")


@pytest.mark.parametrize("state", [DaemonState.NOT_RUNNING, DaemonState.STALE_PID_FILE, DaemonState.NO_PIPE_DIR])
def test_a_watched_daemon_that_is_not_running_serves_nothing(state):
    snapshot = joined(control(daemon(state, reason="stale pid file: names pid 9")), engine())
    [e] = snapshot.derived.engines
    assert e.pipe_dir_served is False and e.pipe_dir_served_detail == "not served: stale pid file: names pid 9"
    assert families(snapshot)["mps_engine_pipe_dir_served"] == [({"engine": "a:8001"}, 0.0)]
    [entry] = health_report(snapshot, "test", now=1.0)["engines"]
    assert entry["verdict"] == "DEGRADED"
    assert entry["reason"].startswith(f"its CUDA_MPS_PIPE_DIRECTORY {PIPE} is not served: stale pid file: names pid 9")


@pytest.mark.parametrize("state", [DaemonState.EXEC_FAILED, DaemonState.HUNG, DaemonState.GARBAGE])
def test_a_daemon_the_agent_cannot_query_leaves_served_unknown_with_no_series(state):
    snapshot = joined(control(daemon(state, reason="cannot run the control program")), engine())
    [e] = snapshot.derived.engines
    assert e.pipe_dir_served is None
    assert e.pipe_dir_served_detail == f"unknown: its control daemon cannot be queried ({state.value}: cannot run the control program)"
    assert "mps_engine_pipe_dir_served" not in families(snapshot)
    report = health_report(snapshot, "test", now=1.0)
    [entry] = report["engines"]
    assert entry["verdict"] == "OK" and entry["pipe_dir_served"] is None
    assert f"pipe dir {PIPE} served? unknown: its control daemon cannot be queried" in render_text(report)
    assert "served by no" not in render_text(report) and "not served" not in render_text(report)


@pytest.mark.parametrize(("configured_only", "why"), [
    (True, "only the configured pipe dirs are watched"),
    (False, "no daemon was found for it"),
])
def test_a_pipe_dir_that_is_not_watched_is_unknown_not_unserved(configured_only, why):
    snapshot = joined(control(daemon(DaemonState.UP, pipe_dir="/run/a"), configured_only=configured_only), engine())
    [e] = snapshot.derived.engines
    assert e.pipe_dir_served is None
    assert e.pipe_dir_served_detail == f"unknown: mpswatch does not watch this pipe dir ({why})"
    assert "mps_engine_pipe_dir_served" not in families(snapshot)


def test_no_control_data_leaves_served_unknown():
    [e] = joined(None, engine()).derived.engines
    assert (e.pipe_dir_served, e.pipe_dir_served_detail) == (None, "unknown: the MPS control collector has no data")


def test_a_hidden_environment_has_no_pipe_dir_and_no_verdict_on_it():
    [e] = joined(control(daemon(DaemonState.UP)), engine(pipe_dir=None, pipe_dir_set=None)).derived.engines
    assert (e.pipe_dir_served, e.pipe_dir_served_detail) == (None, None)


@pytest.mark.parametrize(("setting", "engines", "expected"), [
    ("true", (), (True, "configured", "mps_control.expected = true")),
    ("false", (engine(),), (False, "configured", "mps_control.expected = false")),
    ("auto", (engine(pipe_dir_set=False), engine(name="b", pipe_dir="/run/b")),
     (True, "engine_pipe_dir", "engine b sets CUDA_MPS_PIPE_DIRECTORY=/run/b")),
    ("auto", (engine(pipe_dir_set=False),), (False, "no_engine_pipe_dir", "no engine sets CUDA_MPS_PIPE_DIRECTORY")),
    ("auto", (), (False, "no_engine_pipe_dir", "no engine sets CUDA_MPS_PIPE_DIRECTORY")),
])
def test_mps_is_expected_as_configured_or_when_an_engine_asks_for_it(setting, engines, expected):
    snapshot = joined(control(expected=setting), *engines)
    e = snapshot.derived.mps_expected
    assert (e.expected, e.reason, e.detail) == expected
    assert families(snapshot)["mps_control_expected"] == [({"reason": expected[1]}, 1.0 if expected[0] else 0.0)]
    assert families(snapshot)["mps_control_daemons"] == [({}, 0.0)]


def test_whether_mps_is_expected_is_unknown_while_an_engines_environment_is_hidden():
    snapshot = joined(control(), engine(pipe_dir_set=False), engine(name="b", pipe_dir=None, pipe_dir_set=None))
    assert snapshot.derived.mps_expected is None
    assert "mps_control_expected" not in families(snapshot)
    assert health_report(snapshot, "test", now=1.0)["mps_expected"] is None


def test_without_engine_data_auto_expectation_is_unknown_and_a_configured_one_stands():
    assert snapshot_of(mps_control=control()).derived.mps_expected is None
    assert snapshot_of(mps_control=control(expected="true")).derived.mps_expected.expected is True


@pytest.mark.parametrize(("setting", "engines", "verdict"), [
    ("auto", (engine(),), "DOWN"),
    ("true", (), "DOWN"),
    ("auto", (engine(pipe_dir_set=False),), "DEGRADED"),
    ("auto", (engine(pipe_dir=None, pipe_dir_set=None),), "DEGRADED"),
    ("false", (engine(),), "OK"),
])
def test_no_daemon_is_down_where_mps_is_expected_and_ok_where_it_is_configured_not_to_be(setting, engines, verdict):
    report = health_report(joined(control(expected=setting), *engines), "test", now=1.0)
    assert report["verdict"] == verdict
    assert report["summary"].startswith("MPS: no control daemon found" if verdict != "OK" else "no MPS control daemon found")
