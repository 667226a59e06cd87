"""A label value that cannot be encoded (an undecodable byte in a directory name) costs nothing but
its own spelling, and a renderer that cannot answer shows in /healthz."""

from __future__ import annotations

import os

from mpswatch.exporter import _Rendered
from mpswatch.metrics import Families
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.agentproc import Agent, key
from tests.kit.fakedaemon import FAKE_CONTROL

FAST = ["--mps-control-bin", FAKE_CONTROL, "--interval", "0.5", "--command-timeout", "1"]


def test_a_pipe_dir_named_with_an_undecodable_byte_leaves_every_other_series(tmp_path, fake_daemon):
    daemon = fake_daemon("healthy_two_clients_driver580")
    bad = tmp_path / os.fsdecode(b"x\xfe")  # what os.listdir or argv gives for the byte 0xfe
    bad.mkdir()
    (bad / "control").touch()
    shown = str(tmp_path / "x\\xfe")  # the byte spelt as \xfe in the label value
    args = [*FAST, "--pipe-dir", daemon.path, "--pipe-dir", str(bad)]
    with Agent(args, log_path=tmp_path / "agent.log") as agent:
        samples = agent.wait_for(lambda s: s if s.get(key("mps_control_up", pipe_dir=daemon.path)) == 1
                                 and key("mps_control_up", pipe_dir=shown) in s else None)
        assert samples[key("mps_clients", pipe_dir=daemon.path, uid="",
                           gpu_uuid="GPU-2ea0ea17-0206-eb44")] == 2
        assert samples[key("mps_control_up", pipe_dir=shown)] == 0
        assert agent.get("/healthz")[0] == 200


def test_label_values_that_utf_8_cannot_encode_are_spelt_with_escapes():
    out = Families()
    out.add("mps_control_up", [os.fsdecode(b"/run/x\xfe")], 1)
    out.add("mps_control_up", ["/run/lone\ud800"], 1)
    out.add("mps_control_up", ["/run/é"], 1)
    text = generate_latest(_Rendered(list(out))).decode()
    assert [sample.labels["pipe_dir"] for family in text_string_to_metric_families(text) for sample in family.samples] == [
        "/run/x\\xfe", "/run/lone\\ud800", "/run/é"]
