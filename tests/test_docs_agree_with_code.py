"""The docs say what the code does: every setting default the prose states is the one declared in
agent/mpswatch/config.py (SETTINGS), and every Documentation= of the shipped systemd units resolves.

A default claim is "default 2 s", "the default 2 s interval", "5 by default", "default: 1 MiB", or a
quantity followed by the setting it belongs to ("every 30 s (`mps_control.settings_interval_seconds`)").
A claim must name its setting (key, flag or MPSWATCH_* variable) in the same sentence, unless another
program owns the default ("vLLM's default port") or it is listed in NOT_SETTINGS below with the reason;
an unnamed claim fails, because a value nobody ties to a setting is one nobody updates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mpswatch.config import SETTINGS, Setting

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy/README.md",
        ROOT / "deploy/reference/README.md", ROOT / "alerts/runbooks.md"]

# (file, words of the sentence) -> why the default stated there is not one of SETTINGS'
NOT_SETTINGS = {
    ("docs/mps-gain.md", "`--window` seconds apart, 5 by default"): "an option of `advise` only, not a setting",
    ("docs/engines.md", "(`--port`, default 8000)"): "vLLM's flag",
}
# whose default it is, when it is not mpswatch's
OTHER_OWNERS = re.compile(r"(vLLM's|MPS's|the daemon's|daemon's current|NVIDIA's|the kernel's)\s+(`[^`]*`,\s+)?defaults?", re.I)

UNITS = {"s": 1.0, "ms": 1e-3, "seconds": 1.0, "second": 1.0, "B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
NUMBER = r"(\d+(?:\.\d+)?)(?:\s?(ms|seconds|second|s|bytes|B|KiB|MiB|GiB)\b)?"
DEFAULT_CLAIMS = [
    re.compile(rf"\bdefaults?(?:\s+of|\s+is|:)?\s+(?:\*\*)?{NUMBER}", re.I),  # default 2 s, default: 1 MiB
    re.compile(rf"\bthe default\s+{NUMBER}", re.I),  # at the default 2 s interval
    re.compile(rf"\bdefault\s+[a-z]+\s+\({NUMBER}", re.I),  # at its default intervals (2 s
    re.compile(rf"\bdefault port:?\s+(?:\*\*)?{NUMBER}", re.I),
    re.compile(rf"{NUMBER}\s+by default", re.I),
]
# a quantity with the setting named right after it: "1 MiB of each (`--log-backfill`)", "4 MiB cap: `…`"
NAMED_QUANTITY = re.compile(rf"{NUMBER}(?:\s+[a-z]+){{0,3}}(?:\s+\(|[,:]\s+)(`[^`]+`)")


def setting_names(setting: Setting) -> list[str]:
    names = [setting.env, f"`{setting.key}`"]
    if "." in setting.key:
        names.append(setting.key)
    if setting.flag:
        names.append(setting.flag.name)
    return names


SETTING_NAMES = {name.strip("`") for setting in SETTINGS for name in setting_names(setting)}


def mentioned(sentence: str) -> list[tuple[int, Setting]]:
    """Settings the sentence names, with where."""
    found = []
    for setting in SETTINGS:
        for name in setting_names(setting):
            for match in re.finditer(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", sentence):
                found.append((match.start(), setting))
    return found


@dataclass(frozen=True)
class Claim:
    file: str
    sentence: str
    at: int
    number: float
    unit: str | None

    @property
    def value(self) -> float:
        return self.number * UNITS[self.unit] if self.unit else self.number

    @property
    def kind(self) -> str:
        if self.unit is None:
            return "number"
        return "seconds" if self.unit in ("s", "ms", "seconds", "second") else "bytes"


def declared(setting: Setting, kind: str) -> float | None:
    """The setting's default as a number of this kind; None when the kinds do not fit."""
    if setting.key.endswith("_seconds"):
        return float(setting.default) if kind == "seconds" else None
    if setting.key.endswith("_bytes"):
        return float(setting.default) if kind in ("bytes", "number") else None
    if setting.key == "listen":
        return float(setting.default.rpartition(":")[2]) if kind == "number" else None
    if isinstance(setting.default, int) and not isinstance(setting.default, bool):
        return float(setting.default) if kind == "number" else None
    return None


def sentences(text: str) -> list[str]:
    """Prose cut at sentence ends, blank lines and table cells, whitespace folded."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(part.split()) for part in re.split(r"(?<=[.;!?])\s+(?=[A-Z`(*])|\n\s*\n|\|", text) if part.strip()]


def claims(name: str, text: str) -> list[Claim]:
    found = []
    for sentence in sentences(text):
        spans = set()
        for pattern in (*DEFAULT_CLAIMS, NAMED_QUANTITY):
            for match in pattern.finditer(sentence):
                if match.span(1) in spans or (pattern is NAMED_QUANTITY and match.group(3).strip("`") not in SETTING_NAMES):
                    continue
                spans.add(match.span(1))
                found.append(Claim(name, sentence, match.start(1), float(match.group(1)), match.group(2)))
    return found


def exception_for(claim: Claim) -> tuple[str, str] | None:
    return next(((file, words) for file, words in NOT_SETTINGS if file == claim.file and words in claim.sentence), None)


def check(claim: Claim) -> str | None:
    """None when the claim holds; else what is wrong with it."""
    before = claim.sentence[:claim.at]
    if OTHER_OWNERS.search(before[-60:]) or exception_for(claim):
        return None
    candidates = [(abs(at - claim.at), setting, value) for at, setting in mentioned(claim.sentence)
                  if (value := declared(setting, claim.kind)) is not None]
    if claim.sentence.lower().lstrip("# ").startswith("default port"):  # a heading: "Default port: 19863"
        listen = next(s for s in SETTINGS if s.key == "listen")
        candidates.append((0, listen, declared(listen, "number")))
    if not candidates:
        return f"{claim.file}: names no setting for the default it states: {claim.sentence!r}"
    _, setting, value = min(candidates, key=lambda c: c[0])
    if abs(claim.value - value) > 1e-9 * max(1.0, value):
        return (f"{claim.file}: says {setting.key} defaults to {claim.number:g}{' ' + claim.unit if claim.unit else ''}, "
                f"config.py declares {setting.default_text}: {claim.sentence!r}")
    return None


def test_every_default_the_docs_state_is_the_declared_one():
    every = [claim for path in DOCS for claim in claims(str(path.relative_to(ROOT)), path.read_text())]
    assert len(every) >= 10, "the claim finder found almost nothing: its patterns no longer fit the docs"
    problems = [problem for claim in every if (problem := check(claim))]
    assert not problems, "\n".join(problems)


def test_every_exception_still_excuses_a_claim():
    """An entry of NOT_SETTINGS that excuses nothing any more could excuse a new claim unnoticed."""
    every = [claim for path in DOCS for claim in claims(str(path.relative_to(ROOT)), path.read_text())]
    assert {exception_for(claim) for claim in every} - {None} == set(NOT_SETTINGS)


@pytest.mark.parametrize("text,problem", [
    ("The deadline (default 2 s) ends it.", "names no setting"),
    ("A deadline (`mps_control.timeout_seconds`, default 2 s) ends it.", "defaults to 2 s, config.py declares 1"),
    ("It reads back 4 MiB of each (`--log-backfill`).", "defaults to 4 MiB"),
    ("### Default port: 9100", "defaults to 9100"),
])
def test_the_checker_catches_drift(text, problem):
    """The checker itself, on sentences wrong in the ways the docs were."""
    found = [check(claim) for claim in claims("probe.md", text)]
    assert any(f and problem in f for f in found), found


# systemd units: Documentation= must lead somewhere once the unit is installed

VENDOR_DOCS = {"docs.nvidia.com", "docs.vllm.ai"}  # other projects' manuals; not fetched (no network in tests)


def installed_by_the_docs() -> set[str]:
    """Files the systemd install steps of deploy/README.md put in place (`install` lines)."""
    section = (ROOT / "deploy/README.md").read_text().split("## systemd", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, re.S)
    installed = set()
    for line in block.splitlines():
        words = line.split("#", 1)[0].split()
        if "install" not in words or "-d" in words:
            continue
        args = [w for w in words[words.index("install") + 1:] if not w.startswith("-") and not w.isdigit()]
        *sources, target = args
        for source in sources:
            assert (ROOT / source).is_file(), f"deploy/README.md installs {source}, which is not in the repository"
            installed.add(target if "-D" in words and len(sources) == 1 and not target.endswith("/")
                          else f"{target.rstrip('/')}/{Path(source).name}")
    return installed


def documentation_uris() -> list[tuple[str, str]]:
    return [(unit.name, uri) for unit in sorted((ROOT / "deploy").rglob("*.service"))
            for line in unit.read_text().splitlines() if line.startswith("Documentation=")
            for uri in line.split("=", 1)[1].split()]


def test_every_units_documentation_resolves_after_install():
    uris = documentation_uris()
    assert {unit for unit, _ in uris} >= {"mpswatch.service", "nvidia-mps.service"}
    installed = installed_by_the_docs()
    for unit, uri in uris:
        parts = urlsplit(uri)
        if parts.scheme == "file":
            assert parts.path in installed, f"{unit}: {uri} is not installed by deploy/README.md's steps ({sorted(installed)})"
        else:
            assert parts.scheme == "https" and parts.hostname in VENDOR_DOCS, f"{unit}: {uri} cannot be checked to resolve"
