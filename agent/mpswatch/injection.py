"""What code may replace in a running agent and configuration may not: a fake NVML, a narrower
view of the node's processes. Tests and benchmarks pass these to `mpswatch.cli.main`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Injected:
    nvml_loader: Callable[[], Any] | None = None  # returns the NVML binding; None: nvidia-ml-py
    # given the /proc the agent reads (proc_root), which of its processes the agent may see; None from
    # it, or no process_filter: every process there
    process_filter: Callable[[str], Callable[[int], bool] | None] | None = None
