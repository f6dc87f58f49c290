#!/usr/bin/env python
"""Check that every relative link in README.md and docs/*.md points at a file that exists, and that a
`#heading` part names a heading of that page (GitHub's anchors). Links to the web are not fetched.

    python scripts/check_links.py          # exit 1 listing each broken link as file:line: link (why)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
SPAN = re.compile(r"`[^`\n]+`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _blank(m) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))  # keeps line numbers


def anchors(text: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, -1 -2 for
    repeats."""
    seen, out = {}, set()
    for title in HEADING.findall(FENCE.sub(_blank, text)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list:
    """["file:line: link (why)"] for each relative link of ``page`` that does not resolve."""
    text = page.read_text()
    prose = SPAN.sub(_blank, FENCE.sub(_blank, text))
    problems = []
    for m in LINK.finditer(prose):
        link = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        line = prose.count("\n", 0, m.start()) + 1
        where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{line}: {link}"
        if not target.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
            problems.append(f"{where} (no heading #{anchor} in {target.name})")
    return problems


def pages(root: Path = ROOT) -> list:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main() -> int:
    problems = [p for page in pages() if page.is_file() for p in broken_links(page)]
    for p in problems:
        print(p, file=sys.stderr)
    checked = len([p for p in pages() if p.is_file()])
    print(f"{checked} pages checked, {len(problems)} broken link(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
