"""scripts/check_links.py (`make docs`): relative links of README.md and docs/ point at files and headings."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_links", REPO / "scripts" / "check_links.py")
cl = sys.modules["check_links"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cl)


def test_broken_files_and_headings_are_reported_with_their_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## The `make docs` target\n\n## Runs\n\n## Runs\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#page-a) [ok](docs/a.md#the-make-docs-target) [ok](docs/a.md#runs-1)\n"
        "[web](https://example.org/x) [here](#top)\n"
        "# Top\n"
        "[gone](docs/b.md)\n"
        "```\n[in code](docs/c.md)\n```\n"
        "`[in a span](docs/d.md)` ![picture](img/e.png)\n"
        "[bad anchor](docs/a.md#nothing)\n")
    problems = cl.broken_links(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/b.md (no such file)", "img/e.png (no such file)", "docs/a.md#nothing (no heading #nothing in a.md)"]
    assert [p.split(":")[1] for p in problems] == ["4", "8", "9"]


def test_anchors_follow_githubs_rules():
    assert cl.anchors("# Runs: the index, reports\n## `simclr runs`\n## Runs: the index, reports\n```\n# no\n```\n") \
        == {"runs-the-index-reports", "simclr-runs", "runs-the-index-reports-1"}


def test_the_readme_and_docs_have_no_broken_links():
    pages = [p for p in cl.pages(REPO) if p.is_file()]
    assert REPO / "README.md" in pages and len(pages) > 5
    assert [problem for p in pages for problem in cl.broken_links(p)] == []
