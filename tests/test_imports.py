"""Issue 31: the import graph of `hardener/`, built from the code. Every import statement counts, function-level ones
included; only `if TYPE_CHECKING:` blocks are left out (they never run: annotations only). Once the imports listed in
CONTRIBUTING.md ("Imports that point back up", each with its reason) are taken out, every import points down the
house's table ("Where things live": packages from the bottom up) and the graph has no cycle; each listed import still
exists and is function-level (a module-level one would run at import time and close the cycle)."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hardener"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _targets(mods: dict[str, Path], me: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The hardener modules an import statement loads (`from . import x` loads the module x when there is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        package = me if mods[me].name == "__init__.py" else me.rsplit(".", 1)[0]
        base = node.module or ""
        if node.level:
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*up, base] if base else up)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    found = []
    for n in names:
        while n not in mods and "." in n:
            n = n.rsplit(".", 1)[0]
        if n in mods and n != me:
            found.append(n)
    return found


def import_graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """(edges, the edges made by module-level statements)."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    top_level: set[tuple[str, str]] = set()
    for me, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                for t in _targets(mods, me, node):
                    edges[me].add(t)
                    if id(node) in module_level:
                        top_level.add((me, t))
    return edges, top_level


def listed_back_edges(heading: str = "Imports that point back up") -> dict[tuple[str, str], str]:
    """A CONTRIBUTING.md table under `### heading`: | `importer` | `imported` | why |."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split(f"### {heading}", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(hardener[\w.]*)` \| `(hardener[\w.]*)` \| (.+?) \|$", section, re.M)
    return {(a, b): why for a, b, why in rows}


def house() -> list[str]:
    """CONTRIBUTING.md's house table: the packages (and leaf modules) of `hardener`, from the bottom up."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(hardener[\w.]*)` \|", section, re.M)


def part(module: str, parts: list[str]) -> str:
    """The row of the house a module belongs to: the longest listed name it is or lies under (`hardener` last)."""
    return max((p for p in parts if module == p or module.startswith(p + ".")), key=len, default="")


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycle_but_the_listed_function_level_imports():
    edges, top = import_graph()
    listed = listed_back_edges()
    assert listed, "CONTRIBUTING.md lists the imports that point back up (or says there are none)"
    for (a, b), why in listed.items():
        assert b in edges.get(a, ()), f"{a} -> {b} is listed in CONTRIBUTING.md but no longer imported: drop the row"
        assert (a, b) not in top, f"{a} -> {b} is listed as a back edge but imported at module level"
        assert len(why.strip()) > 10, f"{a} -> {b}: say why"
    rest = {a: {b for b in bs if (a, b) not in listed} for a, bs in edges.items()}
    assert cycle(rest) is None, " -> ".join(cycle(rest))


def test_imports_point_down_the_house():
    """Each module of `hardener/` lies in one row of the house, and imports only from its own row and the rows below
    (listed above it), but for the listed back edges."""
    parts = house()
    assert parts[-1] == "hardener" and len(parts) == len(set(parts)), parts
    rank = {p: i for i, p in enumerate(parts)}
    mods = _modules()
    homeless = [m for m in mods if part(m, parts) == "hardener" and m not in ("hardener", "hardener.__main__")]
    assert not homeless, f"modules in no row of CONTRIBUTING.md's house: {homeless}"
    listed = listed_back_edges()
    edges, _ = import_graph()
    up = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                if rank[part(b, parts)] > rank[part(a, parts)] and (a, b) not in listed)
    assert not up, "imports that point up the house (move one side, or list it with its reason): " + "; ".join(up)


def help_path() -> set[str]:
    """The hardener modules `harden --help` loads (what `import hardener.cli.app` imports)."""
    import subprocess
    import sys

    code = "import sys, hardener.cli.app; print(' '.join(m for m in sys.modules if m.startswith('hardener')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(done.stdout.split())


def test_function_level_imports_only_where_they_keep_help_fast():
    """Issue 31: an import of a hardener module inside a function, in a module off the `--help` path, is a listed back
    edge or a listed lazy import (CONTRIBUTING.md), and each listed lazy import exists and is function-level."""
    edges, top = import_graph()
    lazy, back = listed_back_edges("Imports kept inside functions"), listed_back_edges()
    path = help_path()
    assert "hardener.cli.app" in path and "hardener.api" not in path, sorted(path)
    inside = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                    if (a, b) not in top and a not in path and (a, b) not in back and (a, b) not in lazy)
    assert not inside, "imports inside functions that nothing needs lazy (move them to the top): " + "; ".join(inside)
    for (a, b), why in lazy.items():
        assert b in edges.get(a, ()) and (a, b) not in top and len(why.strip()) > 10, f"{a} -> {b}"


def test_the_house_check_can_fail():
    parts = ["hardener.errors", "hardener.patches", "hardener.cli", "hardener"]
    assert part("hardener.patches.attach", parts) == "hardener.patches"
    assert part("hardener.cli.commands.patch", parts) == "hardener.cli"
    assert part("hardener", parts) == "hardener" and part("hardener.api", parts) == "hardener"  # no row: homeless
    assert "hardener.options" in house() and house().index("hardener.options") < house().index("hardener.cli")


def test_the_graph_sees_function_level_imports_and_finds_a_cycle():
    """The test above can fail: the checker finds a cycle closed by a function-level import."""
    edges, _ = import_graph()
    assert "hardener.errors" in edges["hardener.io.checkpoint"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None
    up = ast.parse("from ..api import patch").body[0]  # in hardener/patches/attach.py: hardener.api
    assert _targets(_modules(), "hardener.patches.attach", up) == ["hardener.api"]
