"""The layering of taildet (docs: the engine's module doc, issue 14): read from the source with ``ast``.

* No import cycle between modules of taildet: the module-level import graph (top-level imports,
  ``from package import submodule`` counted as an import of the submodule, ``if TYPE_CHECKING:``
  blocks left out) has no cycle.
* An import inside a function (or class body) says why on its line or the comment line above it:

  - ``# optional: <why>`` -- an optional or heavy third-party dependency imported on use
    (:data:`OPTIONAL`: matplotlib, scipy, pycocotools, faster_coco_eval, tqdm, fcntl, sklearn, the
    ``torch.distributed`` launcher); never a taildet module;
  - ``# start-up: <why>`` -- the CLI's lazy imports, so that ``taildet --help`` stays fast (only in
    the CLI's own modules).

  An import put inside a function to break a cycle is what the first test forbids.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "taildet"

#: Third-party (or platform) modules that may be imported on use, with ``# optional:``.
OPTIONAL = {"matplotlib", "scipy", "pycocotools", "faster_coco_eval", "tqdm", "fcntl", "torch.distributed",
            "sklearn"}
#: Modules whose function-level imports may be lazy for start-up time (``# start-up:``).
STARTUP_MODULES = {"taildet.cli", "taildet.__main__"}
#: Function-level imports of taildet modules still needed to break a cycle, each with the change
#: that removes it: ``(importing module, imported module)``.
PENDING: set[tuple[str, str]] = set()  # none left: RECIPES is taildet.recipes, machine_info taildet.utils.machine
_TAG = re.compile(r"#\s*(optional|start-up):\s*\S")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]):
    """Imports executed when the module is imported (module body, its ``if`` / ``try`` blocks)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _type_checking(node):
            yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _top_level_imports(block)


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The taildet modules an import statement imports (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:  # relative import
        pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if base not in MODULES:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _trees() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in MODULES.items()}


def import_graph() -> dict[str, set[str]]:
    """``{module: {taildet modules it imports at module level}}``."""
    graph = {}
    for m, tree in _trees().items():
        graph[m] = {t for node in _top_level_imports(tree.body) for t in _imported(node, m)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each as one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(_one_cycle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A cycle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def function_level_imports() -> list[tuple[str, int, str, list[str], str]]:
    """``(module, line, source line, imported names, reason tag or "")`` for every import that is
    not executed at module import time (inside a function or class body)."""
    out = []
    for m, tree in _trees().items():
        lines = MODULES[m].read_text(encoding="utf-8").splitlines()
        top = {id(n) for n in _top_level_imports(tree.body)}
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
                         for child in node.body for n in ast.walk(child)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top or id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = [node.module or ""] if node.level == 0 else _imported(node, m)
            own = lines[node.lineno - 1: node.end_lineno]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            tag = ""
            for text in [*own, above if above.startswith("#") else ""]:
                hit = _TAG.search(text)
                if hit:
                    tag = hit.group(1)
                    break
            out.append((m, node.lineno, lines[node.lineno - 1].strip(), names, tag))
    return sorted(out)


def _optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def test_the_graph_sees_imports_of_submodules():
    graph = import_graph()
    assert "taildet.engine.builders" in graph["taildet.engine.train"]
    assert "taildet.utils.comm" in graph["taildet.losses.state"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"a"}}) == [["a", "a"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between taildet modules:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_level_imports_say_why():
    bad = []
    for module, line, text, names, tag in function_level_imports():
        taildet_names = [n for n in names if n == "taildet" or n.startswith("taildet.")]
        if tag == "start-up" and module in STARTUP_MODULES:
            continue
        if tag == "optional" and names and all(_optional(n) for n in names):
            continue
        if taildet_names and all((module, n) in PENDING for n in taildet_names):
            continue
        bad.append(f"{MODULES[module].relative_to(SRC)}:{line}: {text}" + (f"  [tagged {tag}]" if tag else ""))
    assert not bad, ("imports inside functions need '# optional: <why>' (an optional / heavy dependency) or, "
                     "in the CLI, '# start-up: <why>'; move the others to the top of the module:\n"
                     + "\n".join(bad))


@pytest.mark.parametrize("pair", sorted(PENDING))
def test_pending_cycle_breakers_are_still_needed(pair):
    """An entry of PENDING whose import could move to module level is stale: remove it."""
    importer, imported = pair
    graph = import_graph()
    graph[importer] = graph[importer] | {imported}
    assert cycles(graph), f"{importer} can import {imported} at module level now: drop it from PENDING"
