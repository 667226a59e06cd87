"""Configuration: precedence flag > env > file > default, and one clear message per mistake."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner
from mpswatch.cli import cli, main
from mpswatch.config import BY_KEY, SECTIONS, SETTINGS, Config, ConfigError, EngineTarget, load_config

from tests.kit.agentproc import agent_env, mpswatch_cmd


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_defaults_need_no_config_at_all(monkeypatch):
    monkeypatch.setattr("mpswatch.config.DEFAULT_CONFIG_PATH", "/nonexistent/config.toml")
    config = load_config(None, env={})
    assert config.listen == "0.0.0.0:19863"
    assert config.mps_control.interval_seconds == 2.0
    assert config.mps_control.client_limit == 48
    assert config.mps_control.pipe_dirs == ()
    assert config.engine_scrape.discover is True
    assert config.engines == ()
    assert config.file is None


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    path = write(tmp_path, '[mps_control]\ninterval_seconds = 5\ntimeout_seconds = 3\nclient_limit = 16\n')
    env = {"MPSWATCH_MPS_CONTROL_INTERVAL_SECONDS": "4", "MPSWATCH_MPS_CONTROL_TIMEOUT_SECONDS": "1.5"}
    config = load_config(path, env=env, flags={"mps_control.interval_seconds": "3"})
    assert config.mps_control.interval_seconds == 3.0
    assert config.mps_control.timeout_seconds == 1.5
    assert config.mps_control.client_limit == 16
    assert config.listen == "0.0.0.0:19863"
    assert config.sources["mps_control.client_limit"] == path


def test_pipe_dirs_come_as_a_toml_list_or_a_comma_separated_variable(tmp_path):
    path = write(tmp_path, 'mps_control.pipe_dirs = ["/run/a", "/run/b/"]\n')
    assert load_config(path, env={}).mps_control.pipe_dirs == ("/run/a", "/run/b")
    env = {"MPSWATCH_MPS_CONTROL_PIPE_DIRS": "/x,/y"}
    assert load_config(path, env=env).mps_control.pipe_dirs == ("/x", "/y")


def test_engines_come_as_toml_tables_or_name_url_pairs(tmp_path):
    path = write(tmp_path, '[[engines]]\nname = "a"\nurl = "http://127.0.0.1:8001/metrics"\ngpu_uuid = "GPU-1"\n')
    assert load_config(path, env={}).engines == (EngineTarget("a", "http://127.0.0.1:8001/metrics", "GPU-1"),)
    flags = {"engines": ["b=http://127.0.0.1:8002/metrics"]}
    assert load_config(path, env={}, flags=flags).engines == (EngineTarget("b", "http://127.0.0.1:8002/metrics"),)


@pytest.mark.parametrize(
    "text,key,problem",
    [
        ('[mps_control]\ninterval_seconds = "fast"\n', "mps_control.interval_seconds", "number of seconds from"),
        ("[mps_control]\ninterval_seconds = 0\n", "mps_control.interval_seconds", "from 0.1 to 3600"),
        ("[mps_control]\ninterval_seconds = 1e12\n", "mps_control.interval_seconds", "from 0.1 to 3600"),
        ("[mps_control]\ntimeout_seconds = nan\n", "mps_control.timeout_seconds", "from 0.05 to 60"),
        ("[mps_logs]\nbackfill_bytes = -1\n", "mps_logs.backfill_bytes", "whole number"),
        ("[mps_control]\nclient_limit = 0\n", "mps_control.client_limit", "whole number"),
        ('[mps_control]\npipe_dirs = ["relative/dir"]\n', "mps_control.pipe_dirs", "absolute path"),
        ('listen = "nowhere"\n', "listen", "HOST:PORT"),
        ('log_level = "loud"\n', "log_level", "one of debug"),
        ("[mps_control]\nintervl_seconds = 2\n", "mps_control.intervl_seconds", "unknown key"),
        ('[gpu]\nnvml_module = "tests.fakenvml:h200"\n', "gpu.nvml_module", "unknown key"),
        ("interval_seconds = [\n", "--config", "not valid TOML"),
    ],
)
def test_a_bad_value_names_the_key_the_source_and_the_problem(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), env={})
    assert key in str(raised.value) and problem in str(raised.value)


def test_a_bad_environment_variable_is_named():
    with pytest.raises(ConfigError, match="MPSWATCH_MPS_CONTROL_CLIENT_LIMIT"):
        load_config(None, env={"MPSWATCH_MPS_CONTROL_CLIENT_LIMIT": "many"})
    with pytest.raises(ConfigError, match="MPSWATCH_INTERVAL.*unknown variable"):
        load_config(None, env={"MPSWATCH_INTERVAL": "2"})
    with pytest.raises(ConfigError, match="MPSWATCH_GPU_NVML_MODULE.*unknown variable"):
        load_config(None, env={"MPSWATCH_GPU_NVML_MODULE": "tests.fakenvml:h200"})


def test_a_config_file_that_was_asked_for_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), env={})


@pytest.mark.parametrize(
    "args,env,needle",
    [
        (["status", "--interval", "soon"], {}, "mps_control.interval_seconds (from command line)"),
        (["status"], {"MPSWATCH_MPS_CONTROL_CLIENT_LIMIT": "0"}, "MPSWATCH_MPS_CONTROL_CLIENT_LIMIT"),
        (["run", "--listen", "127.0.0.1"], {}, "listen (from command line)"),
        (["status", "--no-such-flag"], {}, "No such option"),
    ],
)
def test_the_cli_exits_2_with_one_clear_line_on_bad_config(args, env, needle):
    run = subprocess.run(mpswatch_cmd(*args), env=agent_env(env), capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert needle in run.stderr
    assert "Traceback" not in run.stderr


def test_version_is_printed():
    run = subprocess.run(mpswatch_cmd("--version"), env=agent_env(), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.startswith("mpswatch, version ")


def test_main_takes_its_arguments_from_the_caller(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("mpswatch, version ")


@pytest.mark.parametrize("command", ["run", "status", "advise"])
def test_every_flag_shows_its_default_from_the_declaration(command):
    help_text = " ".join(CliRunner().invoke(cli, [command, "--help"], terminal_width=1000).output.split())
    for setting in SETTINGS:
        if setting.flag is None or (setting.flag.serving_only and command != "run"):
            assert setting.flag is None or setting.flag.name not in help_text
            continue
        default = "error" if setting.key == "log_level" and command != "run" else setting.default_text
        assert f"{setting.flag.name} {setting.flag.metavar} {setting.help}" in help_text
        assert f"[default: {default}]" in help_text.split(setting.flag.name + " ", 1)[1].split(" --", 1)[0]


def test_the_documented_table_is_exactly_the_declared_settings():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = [[cell.strip() for cell in line.split("|")[1:5]] for line in docs.splitlines() if line.startswith("| `")]
    declared = []
    for setting in SETTINGS:
        flag = f"`{setting.flag.name}`{' (repeatable)' if setting.flag.repeatable else ''}" if setting.flag else ""
        declared.append([f"`{setting.key}`", f"`{setting.env}`", flag, f"`{setting.toml_default}`"])
    assert rows == declared


def test_the_typed_config_has_a_place_for_every_setting_and_no_other():
    places = {f"{table}.{field.name}" for table, kind in SECTIONS.items() for field in fields(kind)}
    places |= {field.name for field in fields(Config)} - set(SECTIONS) - {"file", "sources"}
    assert places == set(BY_KEY)


def run_cli(*args, env=None):
    return subprocess.run(mpswatch_cmd(*args), env=agent_env(env), capture_output=True, text=True, timeout=60)


def assert_one_line_exit_2(run, expected_start):
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(expected_start) and run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize("by_env", [False, True])
def test_a_port_in_use_exits_2_naming_listen_and_its_source(by_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        run = run_cli("run", env={"MPSWATCH_LISTEN": listen}) if by_env else run_cli("run", "--listen", listen)
    source = "environment MPSWATCH_LISTEN" if by_env else "command line"
    assert_one_line_exit_2(run, f"mpswatch: invalid config: listen (from {source}): cannot listen on {listen}: Address already in use")


def test_an_unresolvable_listen_host_exits_2():
    run = run_cli("run", "--listen", "no-such-host.invalid:19863")
    assert_one_line_exit_2(run, "mpswatch: invalid config: listen (from command line): cannot resolve the host of no-such-host.invalid:19863")


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_config_path_from_the_environment_is_named_as_such(tmp_path, command):
    run = run_cli(command, env={"MPSWATCH_CONFIG": str(tmp_path / "missing.toml")})
    assert_one_line_exit_2(run, f"mpswatch: invalid config: MPSWATCH_CONFIG (from environment): file {tmp_path / 'missing.toml'} does not exist")
    run = run_cli(command, "--config", str(tmp_path / "missing.toml"))
    assert_one_line_exit_2(run, "mpswatch: invalid config: --config (from command line): file ")


@pytest.mark.parametrize(
    "text,key",
    [("mps_control = 2\n", "mps_control"), ('gpu = "fast"\n', "gpu"), ("web = []\n", "web")],
)
def test_a_table_given_a_value_is_a_wrong_type_not_an_unknown_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"{key} \(from .*\): must be a table \(\[{key}\]\) of {key}\.") as raised:
        load_config(write(tmp_path, text), env={})
    assert "unknown key" not in str(raised.value)
