"""No import cycles among m1jax's modules, read from the source with `ast` (nothing is imported).

An edge A -> B for every import statement in A that names B, wherever it stands: at module level or deferred into
a function (a deferred import only hides a cycle until that function runs); only `if TYPE_CHECKING:` blocks are
skipped. `from P import x` is an edge to P (x is read from P's namespace, so P's __init__ runs first) and, when P.x
is a module, to P.x too; `import P.Q` and `from P.Q import y` are edges to P.Q. So a package's __init__ that
imports its submodules is fine, while a submodule that imports a sibling through the package (`from m1jax.rl import
losses` inside m1jax.rl.trainer) closes a cycle with that __init__: import the sibling by its full name instead.

A cycle is reported as the set of modules that reach each other (a strongly connected component), with one shortest
loop through them to show which import to cut.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "m1jax"

# Import cycles tolerated for now, each as the sorted modules of its component: none. A new cycle fails the test,
# and so would a listed one that is gone or has changed.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_names(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """{dotted module name: path} of every module under m1jax/ (a package by its __init__.py)."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every import statement under node, except inside `if TYPE_CHECKING:` (its else branch counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif _is_type_checking(child):
            for other in child.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _imports(child)


def _source(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """{module: the m1jax modules it imports}."""
    names = module_names(root)
    graph = {name: set() for name in names}
    for name, path in names.items():
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                source = _source(name, node, path.name == "__init__.py")
                targets = {source} | {f"{source}.{alias.name}" for alias in node.names}
            graph[name] |= {t for t in targets if t in names and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each as its sorted module names."""
    index, low, stack, on_stack, found = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_loop(graph: dict[str, set[str]], component: tuple[str, ...]) -> list[str]:
    """A shortest import loop from the component's first module back to it (breadth-first)."""
    start = component[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & set(component)):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return [start]


def test_the_graph_sees_the_imports_and_the_cycles():
    graph = import_graph()
    assert "m1jax.model" in graph["m1jax.train.step"]  # an empty graph cannot pass vacuously
    assert "m1jax.rl.losses" in graph["m1jax.rl"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert shortest_loop({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}, ("a", "b", "c")) == ["a", "c", "a"]


def test_no_import_cycles_beyond_the_known_ones():
    graph = import_graph()
    found = cycles(graph)
    new = found - KNOWN_CYCLES
    assert not new, "import cycles among m1jax modules (cut one import of each loop):\n" + "\n".join(
        " -> ".join(shortest_loop(graph, c)) for c in sorted(new))
    gone = KNOWN_CYCLES - found
    assert not gone, "these known cycles are gone or changed: update KNOWN_CYCLES (it only shrinks)\n" + "\n".join(
        map(str, sorted(gone)))
