"""The launcher of agents under test: `mpswatch` as the kit runs it, in a process of its own.

    python -m tests.kit.agent [--nvml FAKE] run|status|advise|--version [ARGS ...]

Calls mpswatch.cli.main with what code injects and configuration cannot:
  - process_filter: only this test session's processes (tests.kit.scope.filter_for), so the
    MPS daemons and engines of other suites and of the machine stay out of what the agent sees;
  - nvml_loader: with --nvml, a fake NVML (FAKE is a factory of tests.kit.fakenvml: h200,
    h200_all_mps, from_layout, no_driver); without it, nvidia-ml-py.
and declares the defaults of where the agent looks on its own (pipe dirs, log dir, device-plugin
root, kubelet socket, config file) inside the session's scope directory (tests.kit.scope.SCOPED_DEFAULTS):
a test's flags, environment and config file still override them, as they override any default.
"""

from __future__ import annotations

import dataclasses
import sys

from mpswatch import config
from mpswatch.cli import main as mpswatch_main
from mpswatch.injection import Injected

from tests.kit import scope

NVML_FAKES = ("h200", "h200_all_mps", "from_layout", "no_driver")


def scope_the_defaults() -> None:
    """SCOPED_DEFAULTS' settings declared with the scope's defaults, in this process's config module."""
    config.DEFAULT_CONFIG_PATH = str(scope.DEFAULT_CONFIG_FILE)
    scoped = set()
    for index, setting in enumerate(config.SETTINGS):
        if setting.key in scope.SCOPED_DEFAULTS:
            scoped_setting = dataclasses.replace(setting, default=scope.SCOPED_DEFAULTS[setting.key])
            config.SETTINGS[index] = config.BY_KEY[setting.key] = scoped_setting
            scoped.add(setting.key)
    if scoped != set(scope.SCOPED_DEFAULTS):
        raise RuntimeError(f"tests.kit.agent: no such settings: {sorted(set(scope.SCOPED_DEFAULTS) - scoped)}")


def main(argv: list[str]) -> int:
    nvml = None
    if argv[:1] == ["--nvml"]:
        nvml, argv = argv[1], argv[2:]
        if nvml not in NVML_FAKES:
            print(f"tests.kit.agent: --nvml {nvml}: not one of {', '.join(NVML_FAKES)}", file=sys.stderr)
            return 2
    scope_the_defaults()
    nvml_loader = None
    if nvml:
        from tests.kit import fakenvml  # only then: an agent on the real NVML carries no fake (its RSS is measured)

        nvml_loader = getattr(fakenvml, nvml)
    injected = Injected(nvml_loader=nvml_loader, process_filter=scope.filter_for)
    return mpswatch_main(argv, injected=injected)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
