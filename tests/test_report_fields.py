"""The report fields a team lead forwards (issue 33): one accuracy table per model, attack settings as a table, the
eps curve from eps 0 across the page, threat models that did not run on one line, a numbers-only `summary`, and a
quick note that names no JSON key. One real `harden eval` (PGD, 2 steps) on the tiny patched model feeds them all."""
from __future__ import annotations

import html
import json
import math
import re

import pytest

from hardener.cli.app import main
from hardener.reports import report as R
from hardener.reports.tracking import numeric_metrics

from conftest import ARCH


@pytest.fixture(scope="module")
def reports(patched_ckpt, tiny_test_data, tmp_path_factory):
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("reports")
    r = CliRunner().invoke(main, [
        "eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd", "--steps", "2",
        "--eps", "0.15", "--threat", "whitebox,transfer", "--eps-sweep", "0.05,0.1", "--quiet", "--no-checks",
        "--report", str(d / "r.json"), "--report", str(d / "r.md"), "--report", str(d / "r.html")])
    assert r.exit_code == 0, r.output
    return json.loads((d / "r.json").read_text()), (d / "r.md").read_text(), (d / "r.html").read_text()


def _md_tables(md: str) -> dict[str, list[list[str]]]:
    """The Markdown accuracy tables by model: their rows as cells (header first)."""
    out = {}
    for name, body in re.findall(r"Accuracy of \*\*(\w+)\*\*:\n\n((?:\|.*\|\n)+)", md):
        lines = [ln for ln in body.splitlines() if not ln.startswith("|---")]
        out[name] = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return out


def test_one_accuracy_table_per_model_without_repeated_rows(reports):
    rep, md, page = reports
    tables = _md_tables(md)
    assert list(tables) == ["base", "patched"]
    n_right = rep["models"]["patched"]["correct_by_base"]["clean"]["n"]
    for name, (head, *rows) in tables.items():
        # the base-correct subset is a labelled column, not a second set of rows
        assert head == ["threat model", "attacks (accuracy after each)", "accuracy [95% CI]",
                        f"on the {n_right} images the base gets right"]
        labels = [r[0] for r in rows]
        assert len(labels) == len(set(labels)) and not any("base-correct" in c for r in rows for c in r)
    assert [r[0] for r in tables["patched"][1:]] == ["clean", "white-box", "transfer", "worst case"]
    assert [r[0] for r in tables["base"][1:]] == ["clean", "white-box"]
    m = rep["models"]["patched"]
    assert tables["patched"][2][2] == R.pct(m["threats"]["whitebox"]["robust"])
    assert tables["patched"][2][3] == R.pct(m["correct_by_base"]["whitebox"])
    assert page.count("<table class=acc>") == 2 and "<h3>patched</h3>" in page


def test_threat_models_that_did_not_run_are_one_line_not_rows(reports):
    rep, md, page = reports
    assert set(rep["threat_models"]) == {"whitebox", "transfer"}  # only what ran is described
    assert set(rep["threats_not_run"]) == {"adaptive", "surrogate", "blackbox"}
    assert "query attack" in rep["threats_not_run"]["blackbox"] and "--threat" in rep["threats_not_run"]["adaptive"]
    line = R.not_run_line(rep)
    assert line.startswith("Not run: ") and "black-box" in line and "BPDA" in line
    assert line in md.splitlines()[3] and html.escape(line) in page  # the headline, and below the tables
    assert "not run" not in md.splitlines()[3].split("Not run:")[0]  # no "black-box not run" figures before it
    assert not any(r[0] in ("black-box", "BPDA", "surrogate transfer") for t in _md_tables(md).values() for r in t)


def test_summary_holds_numbers_only_with_the_rest_beside_it(reports):
    rep, _, _ = reports
    s = rep["summary"]
    assert all(type(v) in (int, float) and math.isfinite(v) for v in s.values())
    assert numeric_metrics(s) == {k: float(v) for k, v in s.items()}  # mlflow.log_metrics takes it whole
    m = rep["models"]["patched"]
    assert s["clean"] == round(m["clean"]["accuracy"], 4) and s["transfer"] == round(
        m["threats"]["transfer"]["robust"]["accuracy"], 4) and s["n"] == 45 and s["eps"] == 0.15
    assert not {"blackbox", "adaptive", "surrogate"} & set(s)  # did not run: absent, not null
    assert rep["summary_context"] == {"model": "patched", "norm": "Linf", "attacks": ["pgd"]}
    assert R.validate(rep) == [] and rep["schema"] == "harden.eval-report/3"


def test_attack_settings_are_a_table(reports):
    rep, md, page = reports
    head, rows = R.settings_table(rep)
    assert head[:4] == ["attack", "norm", "eps", "steps"] and head[-2:] == ["other", "run in"]
    (pgd_row, *_) = rows
    assert pgd_row[:4] == ["pgd", "Linf", "0.15", "2"] and "patched white-box" in pgd_row[-1]
    assert "| " + " | ".join(head) + " |" in md and "<th>run in</th>" in page
    assert '{"eps"' not in md and "{&quot;eps&quot;" not in page  # no raw JSON left


def test_eps_curve_starts_at_eps_0_with_the_clean_accuracy_full_width(reports):
    rep, md, page = reports
    assert [p["eps"] for p in rep["eps_sweep"]] == [0.05, 0.1]  # the sweep did not measure eps 0 ...
    svg = re.search(r"<svg [^>]*>", page).group(0)
    assert 'width="100%"' in svg and "viewBox" in svg
    for label, name in (("patched", "patched"), ("base", "base")):  # ... the curve starts there, at clean accuracy
        clean = rep["models"][name]["clean"]["accuracy"]
        assert f"<title>{label}, eps 0: {100 * clean:.1f}%</title>" in page
    sweep_md = md.split("Robustness curve")[1].splitlines()
    first = next(ln for ln in sweep_md if ln.startswith("| 0 "))
    assert R.pct(rep["models"]["patched"]["clean"]) in first and R.pct(rep["models"]["base"]["clean"]) in first
    # a sweep that measured eps 0 keeps its own point (no second one)
    zero = {"eps": 0.0, "attack": "pgd", **rep["models"]["patched"]["clean"]}
    assert [p["eps"] for p in R.sweep_points({**rep, "eps_sweep": [zero, *rep["eps_sweep"]]}, "eps_sweep")] == \
        [0.0, 0.05, 0.1]


def test_the_quick_note_names_no_json_key():
    from hardener.training.report import QUICK_NOTE

    assert QUICK_NOTE.startswith("quick check") and "full_evaluation" not in QUICK_NOTE
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", QUICK_NOTE)  # no snake_case key names in text for readers
