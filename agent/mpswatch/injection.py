"""What code may replace in a running agent and configuration may not: a fake NVML, a narrower
view of the node's processes. Tests and benchmarks pass these to `mpswatch.cli.main`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Injected:
    nvml_loader: Callable[[], Any] | None = None  # returns the NVML binding; None: nvidia-ml-py
    process_visible: Callable[[int], bool] | None = None  # None: every process on the node
