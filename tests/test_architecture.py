"""The shape of the package: no import cycles (function-local imports included), the layering contract of
pyproject.toml, and no source file so long that it holds more than one job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
from conftest import REPO

MAX_LINES = 400


def strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm: the strongly connected components of {node: set(successors)} with 2+ nodes."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict:
    g = grimp.build_graph("simclr")  # every import statement, also those inside functions
    return {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}


def test_tarjan_finds_a_planted_cycle():
    # the checker itself must be able to fail: a 3-cycle beside an acyclic part
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_layering_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "src" / "simclr").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job: {long}"
