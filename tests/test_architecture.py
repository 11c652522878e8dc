"""The package's shape: no import cycle, layers kept, no long function, no borrowed private attribute.

import-linter checks the layers (``pyproject.toml``, run by ``scripts/test.sh``); these tests
check what it has no contract for, on the same import graph (grimp, TYPE_CHECKING imports
included: they are design dependencies too), and run the contracts once more so a plain
``pytest`` sees a broken layer as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "rlmflow"
MAX_FUNCTION_LINES = 100


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of two or more nodes: each one is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def module_graph() -> dict[str, set[str]]:
    """Module -> modules of rlmflow it imports; a package's ``__init__`` re-exports are left out
    (importing ``rlmflow.models`` for a name of ``rlmflow.models.base`` is not a cycle)."""
    graph = grimp.build_graph("rlmflow", exclude_type_checking_imports=False)
    packages = {m for m in graph.modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    return {
        module: {m for m in graph.find_modules_directly_imported_by(module) if m not in packages}
        for module in graph.modules
        if module not in packages
    }


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    assert strongly_connected(module_graph()) == []


def test_the_layers_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_function_over_a_screen() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_no_private_attribute_of_another_module_s_object() -> None:
    """``obj._name`` only on ``self``/``cls`` or on an object of a class of the same module.

    Cross-module reads of third-party internals are listed here with why they stay.
    """
    allowed = {
        # redis-py keeps the socket of a connection private; the fallback sets its linger to 0
        "rlmflow/dispatch/shared.py": {"_reader", "_writer", "_sock"},
        # aiohttp's connector: closing its pool without awaiting, at interpreter exit
        "rlmflow/models/_http.py": {"_close"},
        "rlmflow/sandbox/worker.py": {"_exit"},  # os._exit
    }
    borrowed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        own_private = {
            f.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            for f in c.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef | ast.AnnAssign | ast.Assign)
            and getattr(f, "name", "").startswith("_")
        }
        attributes = _private_attributes_set_on_self(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                continue
            if own and (node.attr in own_private or node.attr in attributes):
                continue  # an object of a class defined here
            if node.attr in allowed.get(rel, set()):
                continue
            borrowed.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert borrowed == []


def _private_attributes_set_on_self(tree: ast.Module) -> set[str]:
    return {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        and target.attr.startswith("_")
    }
