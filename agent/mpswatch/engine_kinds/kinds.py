"""Which kind an engine is: from its command line when it is discovered, from its configuration
(an engine's `kind`), else from the names in its /metrics body; and reading the body as that kind."""

from __future__ import annotations

import re
from collections.abc import Callable

from mpswatch.engine_kinds import AUTO, KINDS, BadMetrics, EngineCommand, EngineSample
from mpswatch.engine_kinds.llamacpp import parse_llamacpp_command, parse_llamacpp_metrics
from mpswatch.engine_kinds.reading import check_text
from mpswatch.engine_kinds.sglang import parse_sglang_command, parse_sglang_metrics
from mpswatch.engine_kinds.tgi import parse_tgi_command, parse_tgi_metrics
from mpswatch.engine_kinds.vllm import parse_vllm_command, parse_vllm_metrics

PARSERS: dict[str, Callable[[str], EngineSample]] = {
    "vllm": parse_vllm_metrics,
    "sglang": parse_sglang_metrics,
    "llamacpp": parse_llamacpp_metrics,
    "tgi": parse_tgi_metrics,
}
_COMMANDS: tuple[Callable[[list[str]], EngineCommand | None], ...] = (
    parse_vllm_command, parse_sglang_command, parse_llamacpp_command, parse_tgi_command)
# a sample, HELP or TYPE line whose name starts with the kind's prefix
_MARKS = {kind: re.compile(rf"^(?:# (?:HELP|TYPE) )?{prefix}", re.MULTILINE) for kind, prefix in
          (("vllm", "vllm:"), ("sglang", "sglang[:_]"), ("llamacpp", "llamacpp:"), ("tgi", "tgi_"))}


def recognise_kind(text: str) -> str | None:
    """The first kind (in KINDS' order) whose names the body has; None when it has none."""
    return next((kind for kind in KINDS if _MARKS[kind].search(text)), None)


def parse_engine_metrics(text: str, kind: str = AUTO) -> EngineSample:
    """Reads the body as `kind`, or (AUTO) as the kind its names say."""
    if kind == AUTO:
        recognised = recognise_kind(text)
        if recognised is None:
            check_text(text)  # says first whether it is Prometheus text at all
            raise BadMetrics(f"no engine metric in the body ({', '.join(KINDS)})")
        kind = recognised
    return PARSERS[kind](text)


def parse_engine_command(argv: list[str]) -> EngineCommand | None:
    """The engine a process's command line runs, of any kind; None for anything else."""
    for parse in _COMMANDS:
        command = parse(argv)
        if command is not None:
            return command
    return None
