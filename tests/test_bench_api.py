"""bench/ is a client of the library: its scripts use harden's public API (`hardener.__all__`: the functions, classes
and public modules `import hardener` offers) and the command line, not its internals. The scripts that measure an
internal on purpose are listed here with the reason."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import hardener

ROOT = Path(__file__).resolve().parent.parent
INTERNALS = {  # script: why it must reach inside
    "apgd_stop_early.py": "compares harden's own APGD with torchattacks' to the bit (hardener.attacks.apgd)",
    "eval_speed.py": "times the evaluation's attack chains themselves against torchattacks' (hardener.evaluation.threats)",
    "hostile_campaign.py": "feeds crafted files and states to the readers that must refuse them",
    "prefilter_layout.py": "times the pre-filter in both CPU layouts (hardener.patches.prefilter.Prefilter)",
    "patch_speed.py": "times the training step with and without the frozen-prefix cache (hardener.training.cache, fit)",
    "report_screenshots.py": "re-renders stored report JSON with the report renderer (hardener.reports.report)",
    "verdict_continue.py": "resumed a verdict's attack chains from their state, as run at the time (an archived run)",
}


def used_names(path: Path) -> set[str]:
    """The hardener names a script reaches: `hardener.X` (attributes, `import hardener.X`, `from hardener.X import
    ...`) and `from hardener import X`; a module inside a package counts as itself (`from hardener.attacks.apgd
    import ...`: `attacks.apgd`, not the public `attacks`)."""
    tree, names = ast.parse(path.read_text()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hardener":
            parts = node.module.split(".")
            names |= {".".join(parts[1:])} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("hardener.")}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hardener":
            names.add(node.attr)
    return names


def test_bench_scripts_use_the_public_api():
    public = set(hardener.__all__)
    scripts = sorted(ROOT.glob("bench/*.py"))
    assert len(scripts) > 10
    off = {p.name: sorted(used_names(p) - public) for p in scripts if p.name not in INTERNALS}
    assert {k: v for k, v in off.items() if v} == {}, "use hardener's public API, or list the script in INTERNALS"
    for name in INTERNALS:  # the list stays true: each listed script exists and does reach an internal
        assert (ROOT / "bench" / name).exists() and used_names(ROOT / "bench" / name) - public, name


def test_the_public_names_exist():
    for name in hardener.__all__:
        assert getattr(hardener, name) is not None, name
    assert re.match(r"\d", hardener.__version__)
