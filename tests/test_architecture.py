"""The shape of the package: no import cycles (function-local imports included), and no source file so long
that it holds more than one job. (The layering contract of pyproject.toml is `lint-imports`, run by
`make lint` and CI.)"""
from __future__ import annotations

import grimp
from conftest import REPO

MAX_LINES = 400


def test_no_import_cycles():
    """No module imports one that (directly or not) imports it back; grimp reads every import statement,
    also those inside functions."""
    g = grimp.build_graph("simclr")
    back = [(a, b) for a in sorted(g.modules) for b in sorted(g.find_modules_directly_imported_by(a))
            if g.chain_exists(importer=b, imported=a)]
    assert back == [], f"import cycles through: {back}"


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "src" / "simclr").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job: {long}"
