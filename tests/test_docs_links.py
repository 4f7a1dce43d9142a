"""The README and the pages under docs/ link to files that exist, and every page is linked.

Framework-free: it reads Markdown only.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _links(page: Path) -> list[str]:
    return [target for target, _ in LINK.findall(page.read_text(encoding="utf-8"))
            if "://" not in target]


def test_docs_relative_links_resolve():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in PAGES for target in _links(page)
              if not (page.parent / target).exists()]
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target).resolve() for target in _links(ROOT / "README.md")}
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, unlinked


def test_readme_opens_with_the_two_commands_then_the_demo_table_then_the_quick_starts():
    headings = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("## ")]
    assert headings[:4] == ["## Two commands", "## What `make demo` prints",
                            "## Check your own model", "## Check your own port"], headings
