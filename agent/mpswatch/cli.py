"""Command line: `mpswatch run` (the agent), `mpswatch status` (one look, for people on call)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import structlog

from mpswatch import __version__
from mpswatch.advisor import LIKELY_SLOWER
from mpswatch.analysis import OK, advice_report, health_report, render_advice, render_text
from mpswatch.collectors.engines import EnginesCollector
from mpswatch.collectors.gpu import GpuCollector, nvml_loader
from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector
from mpswatch.collectors.mps_logs import MpsLogsCollector
from mpswatch.config import DEFAULT_CONFIG_PATH, DEFAULT_PORT, Config, ConfigError, load_config
from mpswatch.exporter import CachedExposition, serve
from mpswatch.exposition import render
from mpswatch.logsetup import configure_logging
from mpswatch.procfs import ProcFS
from mpswatch.runner import kill_all_children
from mpswatch.scheduler import Scheduler, SnapshotStore

EXIT_USAGE = 2

# flag name -> config key; flags left unset fall through to env, file, default
_FLAG_KEYS = {
    "listen": "listen",
    "pipe_dir": "mps_control.pipe_dirs",
    "control_bin": "mps_control.control_bin",
    "interval": "mps_control.interval_seconds",
    "command_timeout": "mps_control.timeout_seconds",
    "client_limit": "mps_control.client_limit",
    "log_dir": "mps_logs.log_dirs",
    "log_backfill": "mps_logs.backfill_bytes",
    "engine": "engines",
    "proc_root": "proc_root",
    "log_level": "log_level",
    "log_format": "log_format",
}


def _config_options(func):
    options = [
        click.option("--config", "config_path", envvar="MPSWATCH_CONFIG", metavar="PATH",
                     help=f"TOML config file [default: {DEFAULT_CONFIG_PATH} when present]."),
        click.option("--pipe-dir", multiple=True, metavar="DIR",
                     help="Watch only this MPS pipe dir (repeatable); default: discover them."),
        click.option("--mps-control-bin", "control_bin", metavar="PATH", help="The nvidia-cuda-mps-control program."),
        click.option("--interval", type=str, metavar="SECONDS", help="Seconds between MPS control queries [2]."),
        click.option("--command-timeout", type=str, metavar="SECONDS", help="Deadline of one control command [1]."),
        click.option("--client-limit", type=str, metavar="N", help="MPS clients allowed per device [48]."),
        click.option("--log-dir", multiple=True, metavar="DIR",
                     help="Follow only this MPS log dir (repeatable); default: discover them."),
        click.option("--log-backfill", type=str, metavar="BYTES",
                     help="At start, read back at most this much of each MPS log [1048576]."),
        click.option("--engine", multiple=True, metavar="NAME=URL",
                     help="A vLLM engine's /metrics URL (repeatable); others are discovered."),
        click.option("--proc-root", metavar="PATH", help="Where /proc is mounted [/proc]."),
        click.option("--log-level", metavar="LEVEL", help="debug, info, warning or error [info]."),
        click.option("--log-format", metavar="FORMAT", help="auto, json or console [auto]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(config_path: str | None, flags: dict[str, Any]) -> Config:
    given = {}
    for flag, value in flags.items():
        if value is None or value == ():
            continue
        given[_FLAG_KEYS[flag]] = list(value) if isinstance(value, tuple) else value
    try:
        return load_config(config_path, flags=given)
    except ConfigError as err:
        click.echo(f"mpswatch: {err}", err=True)
        sys.exit(EXIT_USAGE)


def build_collectors(config: Config) -> list:
    procfs = ProcFS(root=Path(config["proc_root"]))
    discovery = DiscoverySettings(
        pipe_dirs=config["mps_control.pipe_dirs"],
        default_pipe_dirs=config["mps_control.default_pipe_dirs"],
        device_plugin_root=config["device_plugin_root"],
    )
    return [
        MpsControlCollector(
            control_bin=config["mps_control.control_bin"],
            discovery=discovery,
            interval_seconds=config["mps_control.interval_seconds"],
            command_timeout_seconds=config["mps_control.timeout_seconds"],
            client_limit=config["mps_control.client_limit"],
            procfs=procfs,
            settings_refresh_seconds=config["mps_control.settings_interval_seconds"],
        ),
        MpsLogsCollector(
            log_dirs=config["mps_logs.log_dirs"],
            default_log_dir=config["mps_logs.default_log_dir"],
            device_plugin_root=config["device_plugin_root"],
            backfill_bytes=config["mps_logs.backfill_bytes"],
            interval_seconds=config["mps_logs.interval_seconds"],
            procfs=procfs,
            zone=None if config["mps_logs.timezone"] == "local" else ZoneInfo(config["mps_logs.timezone"]),
        ),
        GpuCollector(
            nvml_loader=nvml_loader(config["gpu.nvml_module"]),
            interval_seconds=config["gpu.interval_seconds"],
            deadline_seconds=config["gpu.deadline_seconds"],
            procfs=procfs,
        ),
        EnginesCollector(
            configured=config["engines"],
            discover=config["engine_scrape.discover"],
            interval_seconds=config["engine_scrape.interval_seconds"],
            timeout_seconds=config["engine_scrape.timeout_seconds"],
            max_body_bytes=config["engine_scrape.max_body_bytes"],
            procfs=procfs,
        ),
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mpswatch")
def cli() -> None:
    """Watch NVIDIA MPS control daemons, servers and clients; export Prometheus metrics."""


@cli.command()
@click.option("--listen", metavar="HOST:PORT", help=f"Address for /metrics and /healthz [0.0.0.0:{DEFAULT_PORT}].")
@_config_options
def run(config_path: str | None, **flags: Any) -> None:
    """Run the agent: collect in the background, serve /metrics and /healthz."""
    config = _load(config_path, flags)
    configure_logging(config["log_level"], config["log_format"])
    log = structlog.get_logger()
    store = SnapshotStore()
    scheduler = Scheduler(build_collectors(config), store)
    exposition = CachedExposition(store.current, lambda snapshot: render(snapshot, __version__))
    try:
        httpd = serve(config["listen"], exposition, scheduler.alive)
    except OSError as err:
        log.error("listen_failed", listen=config["listen"], error=err.strerror or str(err))
        sys.exit(1)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    scheduler.start()
    log.info(
        "agent_started",
        version=__version__,
        listen=config["listen"],
        config_file=config.file,
        collectors=[loop.collector.name for loop in scheduler.loops],
    )
    stop.wait()
    log.info("agent_stopping")
    scheduler.stop()
    kill_all_children()
    httpd.shutdown()


def _one_shot_scheduler(config_path: str | None, flags: dict[str, Any]) -> Scheduler:
    """Collectors for a command that prints a report: logs at error level unless asked, since the
    report is the output and state-change logs would only repeat it."""
    if flags["log_level"] is None:
        flags["log_level"] = "error"
    config = _load(config_path, flags)
    configure_logging(config["log_level"], config["log_format"])
    store = SnapshotStore()
    return Scheduler(build_collectors(config), store)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON schema (docs/status.md).")
@_config_options
def status(config_path: str | None, as_json: bool, **flags: Any) -> None:
    """Run every collector once and print a verdict per daemon, server and client.

    Exit status: 0 all OK, 1 something degraded or down, 2 usage or config error.
    """
    report = health_report(_one_shot_scheduler(config_path, flags).run_once(), __version__)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report), nl=as_json)
    sys.exit(0 if report["verdict"] == OK else 1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (docs/mps-gain.md describes it).")
@click.option("--window", type=click.FloatRange(0.5, 300), default=5.0, show_default=True,
              help="Seconds between the two collection runs: GPM activity and the engines' CPU figures need two.")
@_config_options
def advise(config_path: str | None, as_json: bool, window: float, **flags: Any) -> None:
    """Say per GPU whether MPS pays off for the engines on it, with an estimate and what to do.

    Exit status: 0, 1 when engines share a GPU on which MPS is likely slower, 2 usage or config error.
    """
    scheduler = _one_shot_scheduler(config_path, flags)
    scheduler.run_once()
    threading.Event().wait(window)
    report = advice_report(scheduler.run_once())
    click.echo(json.dumps(report, indent=2) if as_json else render_advice(report), nl=as_json)
    sys.exit(1 if any(g["verdict"] == LIKELY_SLOWER and g["engines"] >= 2 for g in report["gpus"]) else 0)


def main() -> int:
    """Click's standalone mode exits 2 on usage errors, as `status` promises."""
    return cli.main(prog_name="mpswatch")
