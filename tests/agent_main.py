"""`python -m tests.agent_main ARGS`: the agent as `python -m mpswatch ARGS` runs it, with the NVML
that MPSWATCH_TEST_NVML names (`tests.fakenvml:h200`, `module:factory`) injected in code, the only
way the agent takes a fake. The variable is removed first: the agent refuses MPSWATCH_* names it
does not know."""

import os
import sys

from mpswatch.cli import main
from mpswatch.collectors.gpu import nvml_loader
from mpswatch.injection import Injected

if __name__ == "__main__":
    spec = os.environ.pop("MPSWATCH_TEST_NVML", None)
    sys.exit(main(sys.argv[1:], injected=Injected(nvml_loader=nvml_loader(spec) if spec else None)))
