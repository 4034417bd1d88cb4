"""Imports run one way: no product module imports, however indirectly, a module that imports it.

The product's modules are the top-level ``*.py`` files of the repository. Every import counts —
at the top, inside a function, under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":`` —
since a circle of type hints is still a circle a reader has to untangle.
"""

import ast

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def imported_modules(path) -> set[str]:
    """The product modules ``path`` imports anywhere in its text."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES.keys()


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of ``graph``, each once, as the path that closes it (``a → b → a``): the
    strongly connected components of more than one module (Tarjan), each walked back to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(set(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_path_around(graph, component) for component in components]


def _path_around(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One import path from the component's first module (by name) back to itself."""
    start = min(component)
    paths = [[start]]
    while paths:  # breadth first: the shortest circle through ``start``
        path = paths.pop(0)
        for imported in sorted(graph[path[-1]] & component):
            if imported == start:
                return [*path, start]
            if imported not in path:
                paths.append([*path, imported])
    raise AssertionError(f"no path around {sorted(component)}")


def test_no_product_module_imports_in_a_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" → ".join(f"{m}.py" for m in c) for c in found)


def test_the_circle_finder_finds_and_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": set()}
    assert circles(graph) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_every_kind_of_import_counts(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nimport config\n"
                      "if TYPE_CHECKING:\n    from store import Store\n"
                      "def f():\n    import delivery.x\n    from web import y\n"
                      "if __name__ == '__main__':\n    from cli import main\n")
    assert imported_modules(module) == {"config", "store", "delivery", "web", "cli"}


# --- Nothing above the store asks which engine it is -------------------------------------------

ENGINE_MODULES = ("store", "engines")  # the store and its engines' files (store_*.py) may


def engine_questions(path) -> list[int]:
    """The lines of ``path`` that read a ``.postgres`` attribute (``store.postgres``, ``ctx.store.postgres``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "postgres"]


def test_no_module_above_the_store_asks_which_engine_it_is():
    """Code above the store asks a capability (``store.shared``: several processes may share the
    database), never the engine's name; what differs by engine lives in the store's files."""
    asked = {f"{name}.py": lines for name, path in sorted(MODULES.items())
             if not name.startswith(ENGINE_MODULES) and (lines := engine_questions(path))}
    assert not asked, f"ask store.shared (or another capability) instead of .postgres: {asked}"
