"""The package's import graph: no module imports one that imports it back, directly or through others.

Every `import` of an `ib` module counts, at the top of a file or inside a function: an import placed inside a
function does not make a cycle go away, it only hides it until that function runs.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import ib

ROOT = Path(ib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: Set[str]) -> str:
    """The module that `name` (a module or a name inside one) lives in."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> Dict[str, Set[str]]:
    """{module: the ib modules it imports}, from the source of every module under ib/."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` steps above this one
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from ib.models import functional` imports the submodule; `from ib.data import Split` a name
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {_resolve(t, modules) for t in targets if t == "ib" or t.startswith("ib.")} - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle found by a depth-first search, each as the path that closes it."""
    found: List[List[str]] = []
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "ib.engine.loop" in graph["ib.engine"]  # the graph is read, not empty
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_figures_and_recipes_stand_on_their_own():
    """`ib.plots` draws from rows alone; `ib.recipe` checks recipes without the training code."""
    graph = import_graph()
    assert graph["ib.plots"] == set()
    assert not any(m.startswith(("ib.engine", "ib.evaluate", "ib.monitor", "ib.sweep")) for m in graph["ib.recipe"])
