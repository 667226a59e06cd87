"""The launcher of agents under test: `mpswatch` as the kit runs it, in a process of its own.

    python -m tests.kit.agent [--nvml FAKE] run|status|advise|--version [ARGS ...]

Calls mpswatch.cli.main with what code injects and configuration cannot:
  - process_visible: only this test session's processes (tests.kit.scope.SessionProcesses), so the
    MPS daemons and engines of other suites and of the machine stay out of what the agent sees;
  - nvml_loader: with --nvml, a fake NVML (FAKE is a factory of tests.kit.fakenvml: h200,
    h200_all_mps, from_layout, no_driver); without it, nvidia-ml-py.
The default pipe dir, log dir and device-plugin root are set inside the session's scope directory
(tests.kit.scope.DEFAULT_DIRS), unless the environment names them: nothing is found there unless the
test puts it there.
"""

from __future__ import annotations

import os
import sys

from mpswatch.cli import main as mpswatch_main
from mpswatch.injection import Injected

from tests.kit import scope

NVML_FAKES = ("h200", "h200_all_mps", "from_layout", "no_driver")


def main(argv: list[str]) -> int:
    nvml = None
    if argv[:1] == ["--nvml"]:
        nvml, argv = argv[1], argv[2:]
        if nvml not in NVML_FAKES:
            print(f"tests.kit.agent: --nvml {nvml}: not one of {', '.join(NVML_FAKES)}", file=sys.stderr)
            return 2
    for variable, directory in scope.DEFAULT_DIRS.items():
        os.environ.setdefault(variable, str(directory))
    nvml_loader = None
    if nvml:
        from tests.kit import fakenvml  # only then: an agent on the real NVML carries no fake (its RSS is measured)

        nvml_loader = getattr(fakenvml, nvml)
    injected = Injected(nvml_loader=nvml_loader, process_visible=scope.SessionProcesses())
    return mpswatch_main(argv, injected=injected)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
