"""Configuration from a TOML file, MPSWATCH_* variables and flags (flag > env > file > default).

Each setting is declared once below; its TOML key, environment variable, flag, validation and
place in the typed `Config` all come from that declaration, so the sources cannot drift apart.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mpswatch.engine_kinds import AUTO, KINDS
from mpswatch.exporter import parse_listen
from mpswatch.httpfetch import redact_url

DEFAULT_CONFIG_PATH = "/etc/mpswatch/config.toml"
DEFAULT_PORT = 19863
ENV_PREFIX = "MPSWATCH_"


class ConfigError(Exception):
    def __init__(self, key: str, source: str, problem: str) -> None:
        super().__init__(f"invalid config: {key} (from {source}): {problem}")


def _seconds(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        problem = f"must be a number of seconds from {low:g} to {high:g}, got {value!r}"
        if isinstance(value, bool):
            raise ValueError(problem)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(problem) from None
        if not low <= number <= high:  # also refuses nan
            raise ValueError(problem)
        return number

    return parse


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        problem = f"must be a whole number from {low} to {high}, got {value!r}"
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(problem)
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(problem) from None
        if not low <= number <= high:
            raise ValueError(problem)
        return number

    return parse


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value.lower()

    return parse


def _expectation(value: Any) -> str:
    """true, false (TOML booleans too) or auto."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _choice("true", "false", "auto")(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _absolute_path(value: Any) -> str:
    path = _text(value)
    if not os.path.isabs(path):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return os.path.normpath(path)


def _path_list(value: Any) -> tuple[str, ...]:
    """A TOML list, or a comma-separated string (environment variables, repeated flags)."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of absolute paths, got {value!r}")
    return tuple(dict.fromkeys(_absolute_path(item) for item in value))


def _zone(value: Any) -> str:
    text = _text(value)
    if text != "local":
        try:
            ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"must be 'local' or a time zone name such as 'UTC' or 'Europe/Berlin', got {value!r}") from None
    return text


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"must be true or false, got {value!r}")


def _url(value: Any) -> str:
    text = _text(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:8000/metrics, got {redact_url(text)!r}")
    return text


@dataclass(frozen=True)
class EngineTarget:
    name: str
    url: str
    gpu_uuid: str | None = None
    kind: str = AUTO  # which engine's names its body has (engine_kinds.KINDS), or recognised from the body


def _engines(value: Any) -> tuple[EngineTarget, ...]:
    """[[engines]] tables in TOML; NAME=URL pairs, comma-separated, in the variable and flags."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of engines, got {value!r}")
    engines, names = [], set()
    for item in value:
        if isinstance(item, str):
            name, sep, url = item.partition("=")
            if not sep:
                raise ValueError(f"an engine is NAME=URL, got {redact_url(item)!r}")
            item = {"name": name.strip(), "url": url.strip()}
        keys = {"name", "url", "gpu_uuid", "kind"}
        if not isinstance(item, dict) or set(item) - keys or "name" not in item or "url" not in item:
            shown = {k: redact_url(v) if k == "url" and isinstance(v, str) else v for k, v in item.items()} \
                if isinstance(item, dict) else item
            raise ValueError(f"an engine has a name, a url and optionally a gpu_uuid and a kind, got {shown!r}")
        gpu_uuid = _text(item["gpu_uuid"]) if "gpu_uuid" in item else None
        kind = item.get("kind", AUTO)
        if kind not in (AUTO, *KINDS):
            raise ValueError(f"an engine's kind is one of {', '.join((AUTO, *KINDS))}, got {kind!r}")
        engine = EngineTarget(_text(item["name"]), _url(item["url"]), gpu_uuid, kind)
        if engine.name in names:
            raise ValueError(f"engine name {engine.name!r} is used twice")
        names.add(engine.name)
        engines.append(engine)
    return tuple(engines)


def _listen(value: Any) -> str:
    text = _text(value)
    parse_listen(text)
    return text


def _optional_text(value: Any) -> str:
    """A string; empty means not set."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag; its value is parsed and checked like the setting's other sources."""

    name: str
    metavar: str
    repeatable: bool = False
    serving_only: bool = False  # only on `run`: the one command that serves HTTP


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: Flag | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    @property
    def default_text(self) -> str:
        """The default as flags' help shows it."""
        if isinstance(self.default, tuple):
            return ", ".join(self.default) or "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default) or "none"

    @property
    def toml_default(self) -> str:
        """The default as a TOML value, as docs/configuration.md shows it."""
        return json.dumps(list(self.default) if isinstance(self.default, tuple) else self.default)


SETTINGS = [
    Setting(
        "listen",
        _listen,
        f"0.0.0.0:{DEFAULT_PORT}",
        "HOST:PORT for /metrics and /healthz.",
        Flag("--listen", "HOST:PORT", serving_only=True),
    ),
    Setting(
        "web.config_file",
        _optional_text,
        "",
        "Web configuration file for TLS and basic auth, in the Prometheus exporter toolkit's format "
        "(docs/configuration.md#tls-and-basic-auth).",
        Flag("--web.config.file", "PATH", serving_only=True),
    ),
    Setting(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Lowest level logged: debug, info, warning or error.",
        Flag("--log-level", "LEVEL"),
    ),
    Setting(
        "log_format",
        _choice("auto", "json", "console"),
        "auto",
        "auto (console on a TTY, else JSON lines), json or console.",
        Flag("--log-format", "FORMAT"),
    ),
    Setting(
        "proc_root",
        _absolute_path,
        "/proc",
        "Where /proc is mounted (e.g. /host/proc in a container).",
        Flag("--proc-root", "PATH"),
    ),
    Setting(
        "device_plugin_root",
        _absolute_path,
        "/run/nvidia/mps",
        "Root of the Kubernetes device plugin's per-resource MPS dirs.",
    ),
    Setting(
        "mps_control.pipe_dirs",
        _path_list,
        (),
        "Watch only these MPS pipe dirs; none: discover them.",
        Flag("--pipe-dir", "DIR", repeatable=True),
    ),
    Setting(
        "mps_control.default_pipe_dirs",
        _path_list,
        ("/tmp/nvidia-mps", "/run/nvidia-mps"),
        "Pipe dirs discovery looks at.",
    ),
    Setting(
        "mps_control.expected",
        _expectation,
        "auto",
        "Whether this node's GPUs are meant to be shared through MPS: true, false, or auto (when an engine's "
        "environment sets CUDA_MPS_PIPE_DIRECTORY).",
        Flag("--mps-expected", "WHEN"),
    ),
    Setting(
        "mps_control.control_bin",
        _text,
        "nvidia-cuda-mps-control",
        "The MPS control program (PATH is searched).",
        Flag("--mps-control-bin", "PATH"),
    ),
    Setting(
        "mps_control.interval_seconds",
        _seconds(0.1, 3600),
        2.0,
        "Seconds between two queries of each MPS control daemon.",
        Flag("--interval", "SECONDS"),
    ),
    Setting(
        "mps_control.timeout_seconds",
        _seconds(0.05, 60),
        1.0,
        "Deadline of one MPS control command, in seconds.",
        Flag("--command-timeout", "SECONDS"),
    ),
    Setting(
        "mps_control.client_limit",
        _whole(1, 1024),
        48,
        "MPS clients allowed per device.",
        Flag("--client-limit", "N"),
    ),
    Setting(
        "mps_control.settings_interval_seconds",
        _seconds(0, 86400),
        30.0,
        "Seconds between two reads of the thread-percentage and pinned-memory settings.",
    ),
    Setting(
        "mps_control.heartbeat_seconds",
        _seconds(0, 86400),
        60.0,
        "Seconds between two full queries of a daemon whose logs, processes and GPU clients show no change "
        "(each command grows its control.log); 0: every cycle.",
    ),
    Setting(
        "mps_control.liveness_seconds",
        _seconds(0, 86400),
        8.0,
        "Seconds between two get_server_list of a daemon queried on change, so that one that hangs is seen.",
    ),
    Setting("gpu.interval_seconds", _seconds(0.2, 3600), 2.0, "Seconds between two NVML reads (GPM needs 0.1 s or more)."),
    Setting(
        "gpu.deadline_seconds",
        _seconds(0.1, 600),
        5.0,
        "A cycle of NVML calls not done by then marks the GPU collector stale.",
    ),
    Setting(
        "engines",
        _engines,
        (),
        "An engine to scrape besides those discovered (TOML: [[engines]] name, url, optional gpu_uuid, optional "
        "kind: auto (the default: from its metrics' names), vllm, sglang, llamacpp or tgi).",
        Flag("--engine", "NAME=URL", repeatable=True),
    ),
    Setting("engine_scrape.discover", _boolean, True,
            "Find engines (vLLM, SGLang, llama.cpp's server, TGI) from the processes on the node."),
    Setting("engine_scrape.interval_seconds", _seconds(0.2, 3600), 2.0, "Seconds between two scrapes of each engine."),
    Setting("engine_scrape.timeout_seconds", _seconds(0.05, 60), 2.0, "Deadline of one engine's /metrics request."),
    Setting(
        "engine_scrape.max_body_bytes",
        _whole(1024, 1 << 30),
        4 << 20,
        "A /metrics body larger than this marks the engine down.",
    ),
    Setting(
        "engine_scrape.latency_window_seconds",
        _seconds(1, 3600),
        60.0,
        "Engines' latency quantiles and means cover the scrapes of this many last seconds.",
    ),
    Setting(
        "mps_logs.log_dirs",
        _path_list,
        (),
        "Follow only these MPS log dirs; none: discover them.",
        Flag("--log-dir", "DIR", repeatable=True),
    ),
    Setting("mps_logs.default_log_dir", _absolute_path, "/var/log/nvidia-mps", "Log dir discovery looks at."),
    Setting("mps_logs.interval_seconds", _seconds(0.1, 3600), 2.0, "Seconds between two reads of the logs."),
    Setting(
        "mps_logs.backfill_bytes",
        _whole(0, 64 << 20),
        1 << 20,
        "At start, read back at most this many bytes of each MPS log.",
        Flag("--log-backfill", "BYTES"),
    ),
    Setting(
        "mps_logs.timezone",
        _zone,
        "local",
        "Time zone the daemons write their log times in ('local': the agent's).",
    ),
    Setting(
        "pods.pod_resources_socket",
        _absolute_path,
        "/var/lib/kubelet/pod-resources/kubelet.sock",
        "The kubelet's PodResources API socket; when it is not there, pods are not named.",
    ),
    Setting("pods.interval_seconds", _seconds(0.5, 3600), 5.0, "Seconds between two looks at the pods of the node's processes."),
    Setting("pods.timeout_seconds", _seconds(0.05, 60), 2.0, "Deadline of one PodResources List call, in seconds."),
    Setting(
        "pods.max_processes",
        _whole(1, 1 << 20),
        4096,
        "Processes in pods looked at per cycle, at most.",
    ),
]
BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass(frozen=True)
class WebSettings:
    config_file: str


@dataclass(frozen=True)
class MpsControlSettings:
    pipe_dirs: tuple[str, ...]
    default_pipe_dirs: tuple[str, ...]
    expected: str
    control_bin: str
    interval_seconds: float
    timeout_seconds: float
    client_limit: int
    settings_interval_seconds: float
    heartbeat_seconds: float
    liveness_seconds: float


@dataclass(frozen=True)
class MpsLogsSettings:
    log_dirs: tuple[str, ...]
    default_log_dir: str
    interval_seconds: float
    backfill_bytes: int
    timezone: str


@dataclass(frozen=True)
class GpuSettings:
    interval_seconds: float
    deadline_seconds: float


@dataclass(frozen=True)
class EngineScrapeSettings:
    discover: bool
    interval_seconds: float
    timeout_seconds: float
    max_body_bytes: int
    latency_window_seconds: float


@dataclass(frozen=True)
class PodsSettings:
    pod_resources_socket: str
    interval_seconds: float
    timeout_seconds: float
    max_processes: int


# TOML table -> its settings' type; a setting `table.name` is `config.table.name`
SECTIONS = {
    "web": WebSettings,
    "mps_control": MpsControlSettings,
    "mps_logs": MpsLogsSettings,
    "gpu": GpuSettings,
    "engine_scrape": EngineScrapeSettings,
    "pods": PodsSettings,
}


@dataclass(frozen=True)
class Config:
    """The agent's settings, each at the attribute path of its TOML key (`config.gpu.interval_seconds`)."""

    listen: str
    log_level: str
    log_format: str
    proc_root: str
    device_plugin_root: str
    engines: tuple[EngineTarget, ...]
    web: WebSettings
    mps_control: MpsControlSettings
    mps_logs: MpsLogsSettings
    gpu: GpuSettings
    engine_scrape: EngineScrapeSettings
    pods: PodsSettings
    file: str | None  # the TOML file read, if any
    sources: Mapping[str, str]  # key -> where its value came from, as errors name it


def _typed(values: Mapping[str, Any], sources: Mapping[str, str], file: str | None) -> Config:
    sections: dict[str, dict[str, Any]] = {table: {} for table in SECTIONS}
    top: dict[str, Any] = {}
    for key, value in values.items():
        table, _, name = key.rpartition(".")
        (sections[table] if table else top)[name] = value
    typed_sections = {table: SECTIONS[table](**fields) for table, fields in sections.items()}
    return Config(**top, **typed_sections, file=file, sources=sources)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not any(s.key == dotted for s in SETTINGS):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


# where the config file's path came from, as errors name it: (the name given, its source)
FROM_FLAG = ("--config", "command line")
FROM_ENV = (ENV_PREFIX + "CONFIG", "environment")
FROM_DEFAULT = ("config file", "default")


def read_config_file(path: str, origin: tuple[str, str] = FROM_FLAG) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(*origin, f"file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(*origin, f"cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(*origin, f"{path} is not valid TOML: {err}") from None
    flat = _flatten(table)
    for key, value in flat.items():
        if key in BY_KEY:
            continue
        inside = [known for known in BY_KEY if known.startswith(key + ".")]
        if inside:  # a table's name given a value: a wrong type, not an unknown key
            raise ConfigError(key, path, f"must be a table ([{key}]) of {', '.join(inside)}, got {value!r}")
        raise ConfigError(key, path, f"unknown key; known keys: {', '.join(sorted(BY_KEY))}")
    return flat


def load_config(
    config_path: str | None,
    env: Mapping[str, str] = os.environ,
    flags: Mapping[str, Any] | None = None,
    config_origin: tuple[str, str] = FROM_FLAG,
) -> Config:
    """`config_path` None means the default file if it exists; a given path must exist.
    `config_origin`: FROM_FLAG or FROM_ENV, where `config_path` came from."""
    file_values: dict[str, Any] = {}
    file_used = None
    if config_path is not None or os.path.exists(DEFAULT_CONFIG_PATH):
        file_used = config_path or DEFAULT_CONFIG_PATH
        file_values = read_config_file(file_used, config_origin if config_path is not None else FROM_DEFAULT)
    known_env = {s.env for s in SETTINGS} | {ENV_PREFIX + "CONFIG"}
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known_env:
            raise ConfigError(name, "environment", "unknown variable; see docs/configuration.md")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        candidates = [
            ((flags or {}).get(setting.key), "command line"),
            (env.get(setting.env), f"environment {setting.env}"),
            (file_values.get(setting.key), file_used or ""),
        ]
        raw, source = next(((v, s) for v, s in candidates if v is not None), (setting.default, "default"))
        try:
            values[setting.key] = setting.parse(raw)
        except ValueError as err:
            raise ConfigError(setting.key, source, str(err)) from None
        sources[setting.key] = source
    return _typed(values, sources, file_used)
