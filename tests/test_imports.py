"""No import cycles inside mixdq/ nor inside bench/: each module imports only what is
below it in the flow.  Function-level imports count too (a late import is a cycle
hidden, not removed); imports only for type checkers do not."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runtime_imports(tree):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from X import m` counts m when m is a
    module, else X)."""
    files = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = {f"{base}.{a.name}" for a in node.names} & set(files)
            targets |= subs if len(subs) == len(node.names) else subs | {base}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["mixdq", "bench"])
def test_no_import_cycles(package):
    graph = import_graph(package)
    assert len(graph) > 5  # the walk found the package
    found = cycles(graph)
    assert found == [], "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")" for c in found)


def test_the_cycle_check_sees_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_shadowed_by_a_verb():
    """`mixdq.quantize`, `mixdq.allocate`, `mixdq.sensitivity` are the verbs; no module of the
    package carries the name of a non-module attribute of it (which `import mixdq.x` or
    `from mixdq import x` would then return instead of the module)."""
    import types

    import mixdq

    modules = {p.stem for p in (ROOT / "mixdq").glob("*.py")} | {
        p.parent.name for p in (ROOT / "mixdq").glob("*/__init__.py")}
    shadowed = [name for name in mixdq.__all__
                if name in modules and not isinstance(getattr(mixdq, name), types.ModuleType)]
    assert shadowed == []


def test_command_line_options_only_in_the_entry_points():
    """Every option of every verb is parsed in mixdq/cli.py (the app's launcher parses its own);
    library modules take plain arguments."""
    entry_points = {"mixdq/cli.py", "mixdq/app/server.py"}
    parsing = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "mixdq").rglob("*.py")
                     if any("argparse" in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module])
                            for n in _runtime_imports(ast.parse(path.read_text()))))
    assert set(parsing) - entry_points == set(), f"argparse outside the entry points: {parsing}"
    assert set(parsing) == entry_points  # the walk sees the imports it is meant to catch
