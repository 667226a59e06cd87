"""Command line: `mpswatch run` (the agent), `mpswatch status` (one look, for people on call)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click
import structlog
from click.core import ParameterSource

from mpswatch import __version__
from mpswatch.advisor import LIKELY_SLOWER
from mpswatch.agentstatus import AgentUnreachable, fetch_status
from mpswatch.analysis import advice_report, health_report, render_advice, render_text
from mpswatch.collectors import Collector
from mpswatch.collectors.engines import EnginesCollector
from mpswatch.collectors.gpu import NVIDIA_ML_PY, GpuCollector
from mpswatch.collectors.mps_control import DiscoverySettings, MpsControlCollector, cheap_signals
from mpswatch.collectors.mps_logs import MpsLogsCollector
from mpswatch.collectors.pods import PodsCollector
from mpswatch.collectors.process import ProcessCollector
from mpswatch.config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    FROM_ENV,
    FROM_FLAG,
    SETTINGS,
    Config,
    ConfigError,
    load_config,
)
from mpswatch.exporter import cached_exposition, cached_status, health, serve
from mpswatch.exposition import render
from mpswatch.injection import Injected
from mpswatch.logsetup import configure_logging, flush_logs, lines_dropped
from mpswatch.procfs import ProcFS
from mpswatch.runner import kill_all_children
from mpswatch.scheduler import Scheduler, SnapshotStore
from mpswatch.sdnotify import start as notify_systemd
from mpswatch.snapshot import NodeSnapshot
from mpswatch.startmemory import release_after_first_cycles
from mpswatch.verdicts import OK
from mpswatch.webconfig import WebConfig, WebConfigError, load_web_config

EXIT_USAGE = 2
# the agent derives the joined facts once for a cycle's publishes (they come within tens of milliseconds of
# each other), not after each: facts lag their data by at most this and a derive
DERIVE_AFTER_SECONDS = 0.1

# click parameter name -> the setting its flag gives
_FLAG_SETTINGS = {setting.key.replace(".", "__"): (setting, setting.flag) for setting in SETTINGS if setting.flag}
# by parameter name: what `status` and `advise` use when the flag is not given, whatever env and
# file say: the report is their output, and state-change logs would only repeat it
_REPORT_FLAG_DEFAULTS = {"log_level": "error"}


Command = TypeVar("Command", bound=Callable[..., Any])


def _setting_options(*, serving: bool) -> Callable[[Command], Command]:
    """`--config` and a flag per setting that declares one, its help and default from the declaration.
    Flags are plain strings, parsed like the setting's other sources; unset ones fall through to
    env, file, default."""

    def decorate(func: Command) -> Command:
        options = [
            click.option("--config", "config_path", envvar=ENV_PREFIX + "CONFIG", metavar="PATH",
                         help=f"TOML config file [default: {DEFAULT_CONFIG_PATH} when present]."),
        ]
        for param, (setting, flag) in _FLAG_SETTINGS.items():
            if flag.serving_only and not serving:
                continue
            repeatable = " Repeatable." if flag.repeatable else ""
            default = setting.default_text if serving else _REPORT_FLAG_DEFAULTS.get(param, setting.default_text)
            options.append(click.option(flag.name, param, multiple=flag.repeatable, metavar=flag.metavar,
                                        help=f"{setting.help}{repeatable} [default: {default}]"))
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _given_flags(flags: dict[str, Any]) -> dict[str, Any]:
    return {
        _FLAG_SETTINGS[param][0].key: list(value) if isinstance(value, tuple) else value
        for param, value in flags.items()
        if value is not None and value != ()
    }


def _config_origin() -> tuple[str, str]:
    """Where --config came from: the flag, or MPSWATCH_CONFIG."""
    from_env = click.get_current_context().get_parameter_source("config_path") is ParameterSource.ENVIRONMENT
    return FROM_ENV if from_env else FROM_FLAG


def _load(config_path: str | None, flags: dict[str, Any]) -> Config:
    try:
        return load_config(config_path, flags=_given_flags(flags), config_origin=_config_origin())
    except ConfigError as err:
        _usage_error(err)


def _usage_error(err: ConfigError) -> NoReturn:
    """The user's mistake: one line that names the setting and where it came from, exit 2."""
    click.echo(f"mpswatch: {err}", err=True)
    sys.exit(EXIT_USAGE)


def _load_web_config(config: Config) -> WebConfig | None:
    if not config.web.config_file:
        return None
    try:
        return load_web_config(config.web.config_file)
    except WebConfigError as err:
        _usage_error(ConfigError("web.config_file", config.sources["web.config_file"], str(err)))


def build_collectors(
    config: Config, injected: Injected | None = None, snapshot: Callable[[], NodeSnapshot] | None = None
) -> list[Collector[Any]]:
    """The typed settings onto each collector's keyword arguments; `injected` replaces NVML and narrows
    the processes seen, for tests. `snapshot` (the store's latest) tells the MPS control collector what the
    logs and NVML saw, so that it asks the daemons only on a change; without it, every cycle."""
    injected = injected or Injected()
    visible = injected.process_filter(config.proc_root) if injected.process_filter else None
    procfs = ProcFS(root=Path(config.proc_root), visible=visible)
    mps_control, mps_logs, gpu, engine_scrape = config.mps_control, config.mps_logs, config.gpu, config.engine_scrape
    discovery = DiscoverySettings(
        pipe_dirs=mps_control.pipe_dirs,
        default_pipe_dirs=mps_control.default_pipe_dirs,
        device_plugin_root=config.device_plugin_root,
    )
    return [
        MpsControlCollector(
            control_bin=mps_control.control_bin,
            discovery=discovery,
            interval_seconds=mps_control.interval_seconds,
            command_timeout_seconds=mps_control.timeout_seconds,
            client_limit=mps_control.client_limit,
            procfs=procfs,
            settings_refresh_seconds=mps_control.settings_interval_seconds,
            expected=mps_control.expected,
            signals=None if snapshot is None else lambda: cheap_signals(snapshot().mps_logs, snapshot().gpu),
            heartbeat_seconds=mps_control.heartbeat_seconds,
            liveness_seconds=mps_control.liveness_seconds,
        ),
        MpsLogsCollector(
            log_dirs=mps_logs.log_dirs,
            default_log_dir=mps_logs.default_log_dir,
            device_plugin_root=config.device_plugin_root,
            backfill_bytes=mps_logs.backfill_bytes,
            interval_seconds=mps_logs.interval_seconds,
            procfs=procfs,
            zone=None if mps_logs.timezone == "local" else ZoneInfo(mps_logs.timezone),
        ),
        GpuCollector(
            nvml_loader=injected.nvml_loader or NVIDIA_ML_PY,
            interval_seconds=gpu.interval_seconds,
            deadline_seconds=gpu.deadline_seconds,
            procfs=procfs,
        ),
        EnginesCollector(
            configured=[asdict(engine) for engine in config.engines],
            discover=engine_scrape.discover,
            interval_seconds=engine_scrape.interval_seconds,
            timeout_seconds=engine_scrape.timeout_seconds,
            max_body_bytes=engine_scrape.max_body_bytes,
            latency_window_seconds=engine_scrape.latency_window_seconds,
            procfs=procfs,
        ),
        PodsCollector(
            pod_resources_socket=config.pods.pod_resources_socket,
            interval_seconds=config.pods.interval_seconds,
            timeout_seconds=config.pods.timeout_seconds,
            max_processes=config.pods.max_processes,
            procfs=procfs,
        ),
        ProcessCollector(),
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mpswatch")
def cli() -> None:
    """Watch NVIDIA MPS control daemons, servers and clients; export Prometheus metrics."""


@cli.command()
@_setting_options(serving=True)
@click.pass_obj
def run(injected: Injected, /, config_path: str | None, **flags: Any) -> None:
    """Run the agent: collect in the background, serve /metrics and /healthz."""
    config = _load(config_path, flags)
    web = _load_web_config(config)
    configure_logging(config.log_level, config.log_format, background=True)
    log = structlog.get_logger()
    received: list[signal.Signals] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum))
        wake.set()

    for signum in _HANDLED_SIGNALS:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)  # blocked across a reload's exec
    store = SnapshotStore(log_lines_dropped=lines_dropped, derive_after_seconds=DERIVE_AFTER_SECONDS)
    scheduler = Scheduler(build_collectors(config, injected, store.current), store)
    exposition = cached_exposition(store.current, lambda snapshot: render(snapshot, __version__))
    status_report = cached_status(store.current, lambda snapshot: health_report(snapshot, __version__))
    try:
        httpd = serve(config.listen, exposition, scheduler.alive, status=status_report, web=web)
    except OSError as err:  # in use, not this node's address, a name that does not resolve, a privileged port
        what = "cannot resolve the host of" if isinstance(err, socket.gaierror) else "cannot listen on"
        _usage_error(ConfigError("listen", config.sources["listen"], f"{what} {config.listen}: {err.strerror or err}"))
    reload = False
    stopping = threading.Event()
    systemd = notify_systemd(lambda: health(scheduler.alive, exposition), stopping)  # READY=1, WATCHDOG=1 while /healthz says 200
    try:
        scheduler.start()
        release_after_first_cycles(store.current, [loop.collector.name for loop in scheduler.loops], stopping)
        log.info(
            "agent_started",
            version=__version__,
            listen=config.listen,
            config_file=config.file,
            tls=bool(web and web.tls),
            basic_auth=bool(web and web.users),
            collectors=[loop.collector.name for loop in scheduler.loops],
        )
        reload = _wait_for_stop_or_reload(wake, received, config_path, flags, log)
    finally:  # whatever ends the wait, no child outlives the agent
        log.info("agent_stopping", reload=reload)
        stopping.set()
        systemd.notify("RELOADING=1" if reload else "STOPPING=1")
        scheduler.stop()
        kill_all_children()
        httpd.shutdown()
        httpd.server_close()
    if reload:
        _replace_process(log)


# SIGHUP reloads (the config file re-read by the same command line), SIGTERM and SIGINT stop
_HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
SIGNAL_POLL_SECONDS = 0.25


def _wait_for_stop_or_reload(
    wake: threading.Event, received: list[signal.Signals], config_path: str | None, flags: dict[str, Any], log: Any
) -> bool:
    """Waits for a signal; True for a SIGHUP whose configuration loads, False for a stop. A SIGHUP
    whose configuration does not load is logged and changes nothing."""
    while True:
        # with a timeout: a signal taken by another thread runs its handler only once the main
        # thread is back in Python, which a wait without one would never be
        while not wake.wait(SIGNAL_POLL_SECONDS):
            pass
        wake.clear()
        signums, received[:] = list(received), []
        if any(signum != signal.SIGHUP for signum in signums):
            return False
        try:
            config = load_config(config_path, flags=_given_flags(flags))
            if config.web.config_file:
                load_web_config(config.web.config_file)
        except (ConfigError, WebConfigError) as err:
            log.error("reload_failed", error=str(err), detail="still running with the configuration it started with")
            continue
        return True


def _replace_process(log: Any) -> NoReturn:
    """A reload is a fresh start in the same process (same PID for systemd and Kubernetes): every
    collector, thread and NVML handle is rebuilt from the new configuration, none carried over.
    The handled signals stay blocked across the exec until the new image handles them."""
    argv = [sys.executable, *sys.orig_argv[1:]]
    log.info("agent_reloading")
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    flush_logs()
    try:
        os.execv(sys.executable, argv)
    except OSError as err:
        log.error("reload_failed", error=err.strerror or str(err), detail="exec failed; exiting")
        flush_logs()
        sys.exit(1)


def _one_shot_scheduler(injected: Injected, config_path: str | None, flags: dict[str, Any]) -> Scheduler:
    """Collectors for a command that prints a report."""
    for param, value in _REPORT_FLAG_DEFAULTS.items():
        if flags[param] is None:
            flags[param] = value
    config = _load(config_path, flags)
    configure_logging(config.log_level, config.log_format)
    store = SnapshotStore()
    return Scheduler(build_collectors(config, injected), store)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON schema (docs/status.md).")
@click.option("--agent", "agent_url", metavar="URL",
              help="Ask the agent running at URL (http://HOST:PORT) instead of looking once: it knows rates "
                   "and remembers the clients of servers that faulted or died.")
@_setting_options(serving=False)
@click.pass_obj
def status(injected: Injected, /, config_path: str | None, as_json: bool, agent_url: str | None, **flags: Any) -> None:
    """Run every collector once (or ask the running agent) and print a verdict per daemon, server and client.

    Exit status: 0 all OK, 1 something degraded or down, 2 usage or config error, or the agent given by
    --agent could not be asked.
    """
    if agent_url is not None:
        try:
            report = fetch_status(agent_url)
        except AgentUnreachable as err:
            click.echo(f"mpswatch status: {err}", err=True)
            sys.exit(EXIT_USAGE)
    else:
        report = health_report(_one_shot_scheduler(injected, config_path, flags).run_once(), __version__)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report), nl=as_json)
    sys.exit(0 if report["verdict"] == OK else 1)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (docs/mps-gain.md describes it).")
@click.option("--window", type=click.FloatRange(0.5, 300), default=5.0, show_default=True,
              help="Seconds between the two collection runs: GPM activity and the engines' CPU figures need two.")
@_setting_options(serving=False)
@click.pass_obj
def advise(injected: Injected, /, config_path: str | None, as_json: bool, window: float, **flags: Any) -> None:
    """Say per GPU whether MPS pays off for the engines on it, with an estimate and what to do.

    Exit status: 0, 1 when engines share a GPU on which MPS is likely slower, 2 usage or config error.
    """
    scheduler = _one_shot_scheduler(injected, config_path, flags)
    scheduler.run_once()
    threading.Event().wait(window)
    report = advice_report(scheduler.run_once())
    click.echo(json.dumps(report, indent=2) if as_json else render_advice(report), nl=as_json)
    sys.exit(1 if any(g["verdict"] == LIKELY_SLOWER and g["engines"] >= 2 for g in report["gpus"]) else 0)


def main(argv: list[str] | None = None, *, injected: Injected | None = None) -> int:
    """Click's standalone mode exits 2 on usage errors, as `status` promises. `injected` is how
    tests and benchmarks give the agent a fake NVML or a narrower view of the node: code, never
    configuration."""
    return cli.main(args=argv, prog_name="mpswatch", obj=injected or Injected())
