"""The shape of the code (issue 15): short functions, a thin command line, click in one module only."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hardener"
MAX_FUNCTION_LINES = 80
MAX_CLI_LINES = 400


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_no_function_is_longer_than_80_lines():
    long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines (decorators included): " + "; ".join(long)


def test_the_command_line_module_is_thin():
    n = len((PACKAGE / "cli" / "app.py").read_text(encoding="utf-8").splitlines())
    assert n < MAX_CLI_LINES, f"hardener/cli/app.py has {n} lines"


def test_only_cli_imports_click():
    importers = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "click" or n.startswith("click.") for n in names):
                importers.append(str(path.relative_to(PACKAGE.parent)))
    assert sorted(set(importers)) == ["hardener/cli/app.py"], importers
