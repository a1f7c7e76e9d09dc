"""The user docs: every link between them leads somewhere, and they say how to use mim, not its
history (figures and their dates live in benchmarks/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_link_between_the_docs_leads_somewhere(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"


def test_user_docs_carry_no_history_or_issue_numbers():
    """Figures and their dates live in benchmarks/README.md; the user docs say how to use mim."""
    dated = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bissue #\d+|\bbefore this\b", re.I)
    pages = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "configs").glob("*/*.yaml")),
    ]
    found = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in pages for m in dated.finditer(p.read_text())]
    assert not found


def test_the_readme_shows_the_demo_table_as_the_demo_writes_it():
    """Every figure row `mim demo` writes is in README.md in the same form, so the demo can tell
    whether README's figures are the ones it measured (it says so at its end)."""
    from pipelines.demo import readme_differences, result_rows

    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", readme, re.M)
    figures = dict(rows)
    accuracy = dict.fromkeys(
        ("linprobe_mae", "linprobe_random", "finetune_mae", "segprobe_mae", "segprobe_random"), 50.0
    )
    curve = [{"step": 0, "top1": 50.0}, {"step": 10, "top1": 60.0}]
    expected = result_rows(accuracy, curve)
    assert all(what in figures for what, _ in expected), [w for w, _ in expected if w not in figures]
    own = [(what, figures[what]) for what, _ in expected]
    assert readme_differences(own, readme) == []
    assert readme_differences([(expected[0][0], "1.00 %")], readme) == [
        f"{expected[0][0]}: README.md {figures[expected[0][0]]}, this run 1.00 %"
    ]
