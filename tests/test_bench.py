"""The benchmark scripts run end to end in their --quick mode, so they cannot rot (numbers are not checked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


END_TO_END = ("fx-a", "fixer-patched", "adv-train", "robust")  # every path of the script: cost runs, --parent, preset


def test_compare_fmnist_quick(tmp_path):
    r = subprocess.run([sys.executable, "bench/compare_fmnist.py", "--quick", "--jobs", "2", "--out-dir", str(tmp_path),
                        "--methods", ",".join(END_TO_END)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = {s["method"] for s in summary["summary"]}
    assert set(END_TO_END) <= methods
    for s in summary["summary"]:
        assert 0 <= s["clean"] <= 1 and 0 <= s["worst_case"] <= s["clean"] and s["patch_peak_rss_mb"] > 0
    assert {c["patch_method"] for c in summary["cost"]} == {"fx-a", "fixer-patched"}
    text = (tmp_path / "RESULTS-compare.md").read_text()
    assert "| adv-train |" in text and "Cost" in text
    # a second run resumes: finished rows are not run again, and the tables still cover every row
    logs = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.log")}
    r = subprocess.run([sys.executable, "bench/compare_fmnist.py", "--quick", "--out-dir", str(tmp_path),
                        "--methods", "fx-a"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.log")} == logs
    again = json.loads((tmp_path / "summary.json").read_text())
    assert {s["method"] for s in again["summary"]} == methods
    r = subprocess.run([sys.executable, "bench/compare_fmnist.py", "--quick", "--out-dir", str(tmp_path),
                        "--tables-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.log")} == logs
    assert "transfer APGD-CE alone" in (tmp_path / "RESULTS-compare.md").read_text()


def test_compare_fmnist_rows_all_pass_the_option_checks(runner):
    """The rows the quick run leaves out (their training is the same code): `harden patch` takes each one's options
    and stops only at the data, which does not exist (a renamed flag or a bad value would stop it first)."""
    import importlib.util

    from hardener.cli.app import main

    spec = importlib.util.spec_from_file_location("compare_fmnist", ROOT / "bench" / "compare_fmnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    missing = ROOT / "no-such-data.npz"
    assert set(END_TO_END) < set(bench.METHODS)
    for name, (_, args) in bench.METHODS.items():
        r = runner.invoke(main, ["patch", str(ROOT / "examples/fmnist_base.safetensors"), "--arch",
                                 str(ROOT / bench.ARCH), *bench.NORM, "--data", str(missing), "--eps", "0.1", *args])
        assert r.exit_code == 2 and f"data '{missing}' does not exist" in r.output, (name, r.output)


def test_patch_speed_quick(tmp_path):
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "bench/patch_speed.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["images_per_s"]) == {"uncached", "cached", "bound"}
    assert "is cached" in res["cache_note"]


def test_hostile_campaign_runs(tmp_path):
    """A slice of the hostile-input campaign (bench/hostile_campaign.py), so the script cannot rot."""
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "bench/hostile_campaign.py", "--only", "code-exec/os:system/predict",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tally = json.loads(out.read_text())["tally"]
    assert tally["cases"] == 3 and tally["as_expected"] == 3 and tally["payload_executed"] == 0


def test_verdict_table_combines_runs_per_sample(tmp_path, patched_ckpt, tiny_test_data):
    """bench/verdict_table.py on two small evaluations of the same samples: the AND of per-sample masks."""
    from click.testing import CliRunner

    from hardener.cli.app import main

    from conftest import ARCH

    common = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.15",
              "--max-samples", "30", "--no-checks", "--quiet"]
    runs = {"aa-white": ["--attack", "apgd-ce", "--steps", "3", "--threat", "whitebox"],
            "aa-fab": ["--attack", "fab-t", "--steps", "3", "--threat", "whitebox"],
            "aa-square": ["--attack", "square", "--queries", "30", "--threat", "blackbox"]}
    for name, extra in runs.items():
        r = CliRunner().invoke(main, [*common, *extra, "--report", str(tmp_path / f"{name}.json")])
        assert r.exit_code == 0, r.output
    r = subprocess.run([sys.executable, "bench/verdict_table.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    v = json.loads((tmp_path / "verdict.json").read_text())
    reps = {n: json.loads((tmp_path / f"{n}.json").read_text())["models"]["patched"] for n in runs}
    masks = {n: [b is None for b in m["per_sample_broken_by"]] for n, m in reps.items()}
    both = sum(all(v) for v in zip(masks["aa-white"], masks["aa-fab"], masks["aa-square"]))
    aa = next(k for k in v["rows"] if k.startswith("standard AutoAttack"))
    assert v["rows"][aa]["correct"] == both
    worst = next(k for k in v["rows"] if k.startswith("worst case"))
    assert v["rows"][worst]["correct"] == both <= min(sum(m) for m in masks.values())
    assert "| clean |" in r.stdout
