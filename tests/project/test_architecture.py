"""The shape of the package: no import cycles, function-local imports included. (The layering contract is
checked by `lint-imports` in `make lint`, and line length by ruff's E501.)"""
from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

import grimp


def test_no_import_cycles():
    g = grimp.build_graph("simclr")  # every import statement, also those inside functions
    graph = {m: set(g.find_modules_directly_imported_by(m)) - {m} for m in g.modules}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
