"""The registered collector units, in the order their families render and their status sections
compose. Adding a collector: its module (with UNIT), a line here, its NodeSnapshot field."""

from __future__ import annotations

from typing import Any

from mpswatch.collectors import CollectorUnit, engines, gpu, mps_control, mps_logs, pods, process

UNITS: tuple[CollectorUnit[Any], ...] = (mps_control.UNIT, mps_logs.UNIT, gpu.UNIT, engines.UNIT, pods.UNIT, process.UNIT)
