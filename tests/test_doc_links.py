"""Every relative link in README.md, deploy/README.md, alerts/runbooks.md and docs/*.md names a file
that exists, and an anchor a heading of its target: raw results cited as a figure's source must not
be moved or removed under a link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "deploy/README.md", ROOT / "alerts/runbooks.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def relative_links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def anchors(doc: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", doc.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


def test_a_link_to_a_removed_file_or_a_missing_heading_is_reported(tmp_path):
    (tmp_path / "kept.json").write_text("{}")
    doc = tmp_path / "doc.md"
    doc.write_text("# Results (H200)\n\n[kept](kept.json), [gone](final/gone.json), [here](#results-h200), "
                   "[nowhere](#gone), [web](https://example.org/x)\n\n```\n[example](not/checked.md)\n```\n")
    assert broken_links(doc) == ["final/gone.json: no such file", "#gone: no heading #gone"]
