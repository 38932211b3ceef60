"""The package's shape: no import cycles, small functions, no module-global switches, no history comments."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "zturbo"
MAX_FUNCTION_LINES = 60
# Gradio page builders: one long declarative layout reads better than one split across helpers.
LAYOUT_BUILDERS = {("serving/ui_app.py", "build")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, except under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_in(child))
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    yield from _imports(node)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The zturbo modules an import statement loads (a package's own submodules by name included)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base_parts = package.split(".")
        base = ".".join(base_parts[: len(base_parts) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            found.add(f"{base}.{alias.name}")
        elif base in known:
            found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in _imports(tree):
            edges |= _targets(name, path, node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["zturbo.engine"], "the graph must see the engine's imports"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_check_sees_function_level_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from . import b\nif TYPE_CHECKING:\n    from . import c\n")
    targets = set()
    for node in _imports(tree):
        targets |= _targets("zturbo.a", SRC / "a.py", node, {"zturbo.a", "zturbo.b", "zturbo.c"})
    assert targets == {"zturbo.b"}


def _long_functions() -> list[str]:
    long = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in LAYOUT_BUILDERS:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_is_longer_than_sixty_lines() -> None:
    assert _long_functions() == []


_SWITCH = re.compile(r"^\s*global\s", re.M)
_HISTORY = re.compile(r"#.*\b(session \d+|run \d+[A-Z]|issue \d+|previously|used to)\b", re.I)


@pytest.mark.parametrize("pattern", [_SWITCH, _HISTORY], ids=["global-statement", "history-comment"])
def test_no_global_switches_or_history_comments(pattern: re.Pattern[str]) -> None:
    hits = [
        f"{path.relative_to(SRC)}: {m.group(0).strip()}"
        for path in SRC.rglob("*.py")
        for m in pattern.finditer(path.read_text())
    ]
    assert hits == []


def test_every_zturbo_variable_is_registered_read_through_config_and_documented() -> None:
    from zturbo.config import ENV_VARS, env

    docs = "".join(p.read_text() for p in (SRC.parents[1] / "docs").glob("*.md"))
    named = {m for path in SRC.rglob("*.py") for m in re.findall(r"ZTURBO_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    # ZTURBO_<FIELD> is how config reads its fields; the table spells each one out.
    assert named - {"ZTURBO_"} <= set(ENV_VARS)
    assert [name for name in ENV_VARS if name not in docs] == []
    readers = [p.name for p in SRC.rglob("*.py") if re.search(r"os\.environ[^\n]*ZTURBO_", p.read_text())]
    assert readers == []
    assert env("ZTURBO_CACHE", {"ZTURBO_CACHE": ""}) is None
    with pytest.raises(KeyError, match="ZTURBO_NOPE"):
        env("ZTURBO_NOPE", {})
