"""The documentation (issue 33): docs/cli.md is generated from the option data and cannot drift from it; the docs
pages the README and mkdocs.yml name exist, and their relative links resolve."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hardener.cli import docs
from hardener.cli import options as O

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    # The committed page is exactly what the options say now: a new or changed option without `python -m
    # hardener.cli.docs` fails here (and in CI, which runs the suite).
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == docs.render(), \
        "docs/cli.md is out of date: run python -m hardener.cli.docs"


def test_cli_reference_covers_every_option_group_and_example():
    from hardener.cli.app import main

    assert {c for c, _, _ in docs.COMMANDS} == set(main.commands), "a command is missing from hardener.cli.docs.COMMANDS"
    text = docs.render()
    for command, specs, _ in docs.COMMANDS:
        section = text.split(f"## `harden {command} ")[1].split("\n## `harden ")[0]
        for spec in specs:
            if not spec.kwargs.get("hidden"):
                assert f"`{spec.decls[0]}`" in section, (command, spec.decls)
        for _, example in O.EXAMPLES[command]:
            assert example in section
    # a plain `harden patch` runs the robust preset: its defaults are shown, not only the built-in ones
    patch = text.split("## `harden patch ")[1].split("\n## `harden ")[0]
    assert re.search(r"\| `--epochs` `N` \| `10` \(custom recipe: `20`\)", patch)
    assert re.search(r"\| `--attack` `TEXT` \| `pgd` \(custom recipe: `apgd`\)", patch)


def test_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch):
    monkeypatch.setattr(docs, "TARGET", tmp_path / "cli.md")
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
    (tmp_path / "cli.md").write_text(docs.render().replace("--epochs", "--epoch"), encoding="utf-8")
    assert docs.main(["--check"]) == 1


def test_render_imports_no_torch():
    code = "import sys; from hardener.cli import docs; docs.render(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_docs_pages_and_links_resolve():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert "cli.md" in nav and all((ROOT / "docs" / page).is_file() for page in nav)
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
