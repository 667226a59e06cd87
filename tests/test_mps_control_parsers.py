"""Pure parsers of the control program's replies, on real H200 (driver 580) captures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpswatch.collectors.mps_control import (
    READ_ONLY_COMMANDS,
    MutatingCommandRefused,
    ParseError,
    classify,
    parse_percentage,
    parse_pinned_limits_env,
    parse_pinned_memory_limit,
    parse_ps,
    parse_server_list,
    parse_server_status,
    plugin_resource,
    read_only_command,
)
from mpswatch.runner import RunResult

CAPTURE = Path(__file__).parent / "fixtures" / "h200-driver580" / "session1-commands.txt"


def captured_reply(command: str) -> str:
    """The reply printed under `== <command>` in the H200 session log."""
    text = CAPTURE.read_text()
    block = text.split(f"== {command}\n", 1)[1]
    lines = [line for line in block.splitlines() if not line.startswith("+ ")]
    reply = lines[: lines.index("rc=0")]
    return "".join(line + "\n" for line in reply)


def test_server_list_reads_the_real_reply():
    assert parse_server_list(captured_reply("get_server_list")) == [476]


def test_server_list_is_empty_when_no_server_runs():
    assert parse_server_list("") == []


def test_server_list_rejects_text_that_is_not_pids():
    with pytest.raises(ParseError):
        parse_server_list("Segmentation fault\n")


def test_ps_reads_both_clients_of_the_real_capture():
    clients = parse_ps(captured_reply("ps"))
    assert [(c.pid, c.client_id, c.server_pid, c.device, c.namespace, c.command) for c in clients] == [
        (437, 1, 476, "GPU-2ea0ea17-0206-eb44", "4026531836", "python3"),
        (438, 2, 476, "GPU-2ea0ea17-0206-eb44", "4026531836", "python3"),
    ]


def test_ps_keeps_a_command_with_spaces_whole():
    text = "PID ID SERVER DEVICE NAMESPACE COMMAND\n12 1 9 GPU-a-b-c 4026531836 python3 -m vllm serve\n"
    assert parse_ps(text)[0].command == "python3 -m vllm serve"


def test_ps_with_only_a_header_means_no_clients():
    assert parse_ps("PID       ID        SERVER         DEVICE                    NAMESPACE      COMMAND\n") == []


@pytest.mark.parametrize("text", ["garbage line\n", "PID ID SERVER\nx y z w v\n"])
def test_ps_rejects_what_it_does_not_understand(text):
    with pytest.raises(ParseError):
        parse_ps(text)


@pytest.mark.parametrize("status", ["ACTIVE", "FAULT", "INITIALIZING"])
def test_server_status_knows_the_documented_states(status):
    assert parse_server_status(status + "\n") == status


def test_server_status_rejects_an_unknown_state():
    with pytest.raises(ParseError):
        parse_server_status("Server 7 not found\n")


def test_percentage_reads_the_real_reply():
    assert parse_percentage(captured_reply("get_default_active_thread_percentage")) == 100.0


@pytest.mark.parametrize("text", ["abc", "150.0", "-1"])
def test_percentage_rejects_nonsense(text):
    with pytest.raises(ParseError):
        parse_percentage(text)


def test_pinned_limit_is_absent_when_the_daemon_prints_nothing():
    # the real daemon prints nothing at all when no limit is set
    assert captured_reply("get_default_device_pinned_mem_limit") == ""
    assert parse_pinned_memory_limit("") is None


@pytest.mark.parametrize("text,expected", [("2G\n", 2 << 30), ("1024M", 1 << 30), ("3G", 3 << 30), ("512MB", 512 << 20)])
def test_pinned_limit_converts_mps_units_to_bytes(text, expected):
    # "2G" is what an H200 daemon answered after set_default_device_pinned_mem_limit 0 2G
    assert parse_pinned_memory_limit(text) == expected


def test_pinned_limit_rejects_garbage():
    with pytest.raises(ParseError):
        parse_pinned_memory_limit("lots")


def test_a_clients_pinned_limits_are_read_per_device_by_ordinal_or_uuid():
    # NVIDIA's example value, and a UUID as CUDA_VISIBLE_DEVICES takes it
    assert parse_pinned_limits_env("0=1G,1=512MB") == {"0": 1 << 30, "1": 512 << 20}
    assert parse_pinned_limits_env("GPU-2ea0ea17=35G") == {"GPU-2ea0ea17": 35 << 30}


@pytest.mark.parametrize("text", ["", "1G", "0=", "=1G", "0=1G,,1=2G", "0=lots"])
def test_a_clients_pinned_limits_that_are_not_device_limit_pairs_are_refused(text):
    with pytest.raises(ParseError):
        parse_pinned_limits_env(text)


@pytest.mark.parametrize(
    "pipe_dir,resource",
    [
        ("/run/nvidia/mps/nvidia.com/gpu/pipe", "nvidia.com/gpu"),  # the plugin's Root.PipeDir
        ("/run/nvidia/mps/nvidia.com/gpu.shared/pipe/", "nvidia.com/gpu.shared"),  # renameByDefault
        ("/run/nvidia/mps/gpu/pipe", "gpu"),
        ("/run/nvidia/mps/nvidia.com/gpu/log", None),
        ("/run/nvidia/mps/pipe", None),
        ("/run/nvidia-mps", None),
        ("/run/nvidia/mpsx/nvidia.com/gpu/pipe", None),
    ],
)
def test_a_pipe_dir_under_the_device_plugins_root_is_named_by_its_resource(pipe_dir, resource):
    assert plugin_resource(pipe_dir, "/run/nvidia/mps") == resource


@given(st.text(max_size=400))
def test_parsers_fail_only_with_parse_error_on_arbitrary_text(text):
    for parser in (parse_server_list, parse_ps, parse_server_status, parse_percentage, parse_pinned_memory_limit,
                   parse_pinned_limits_env):
        try:
            parser(text)
        except ParseError:
            pass


def _result(output="", code=0, **kw):
    return RunResult(returncode=code, output=output, duration_seconds=0.002, **kw)


@pytest.mark.parametrize(
    "result,reason",
    [
        (_result("Cannot find MPS control daemon process\n", 1), "not_running"),
        (_result('Unknown command "help"\n'), "error_reply"),
        (_result("Server 1 not found\n"), "error_reply"),
        (_result("Server not found\n"), "error_reply"),  # `ps` right after its server was killed (H200)
        (_result("Invalid process 99999!\n1\n"), "error_reply"),
        (_result(code=None, timed_out=True), "timeout"),
        (_result(code=None, exec_error="nvidia-cuda-mps-control: No such file or directory"), "exec_failed"),
        (_result("Segmentation fault\n", 139), "garbage_output"),
        (_result("x" * 10, code=None, truncated=True), "garbage_output"),
    ],
)
def test_classify_tells_the_failure_modes_apart(result, reason):
    assert classify(result, 2.0).reason == reason


def test_classify_passes_a_real_answer_through():
    reply = classify(_result("476\n"), 2.0)
    assert reply.reason is None and reply.text == "476\n"


@pytest.mark.parametrize(
    "verb",
    ["quit", "start_server", "shutdown_server", "terminate_client", "set_default_active_thread_percentage",
     "set_active_thread_percentage", "set_default_device_pinned_mem_limit", "set_device_pinned_mem_limit",
     "set_default_client_priority", "sm_partition"],
)
def test_mutating_commands_are_refused(verb):
    with pytest.raises(MutatingCommandRefused):
        read_only_command(verb)


def test_an_argument_cannot_smuggle_a_second_command():
    with pytest.raises(MutatingCommandRefused):
        read_only_command("get_server_status", "476\nquit")


def test_allowlist_holds_only_queries():
    assert all(re.match(r"^(get_|ps$)", verb) for verb in READ_ONLY_COMMANDS)
