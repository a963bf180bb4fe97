"""--mlflow (issue 33): parameters, the numeric summary and files logged to a real local MLflow store, read back with
MLflow's own client; the CI-gate example script run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ARCH, FAST_PATCH, assert_input_error
from hardener.tracking import numeric_metrics

mlflow = pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parent.parent


def test_metrics_are_the_finite_numbers_of_the_summary():
    s = {"clean": 0.9, "robust": 0.5, "attacks": ["apgd-ce"], "model": "patched", "blackbox": None, "ok": True,
         "cost": {"macs_ratio": 1.2, "latency": None}, "bad": float("nan")}
    assert numeric_metrics(s) == {"clean": 0.9, "robust": 0.5, "cost.macs_ratio": 1.2}


def _runs(uri: str):
    client = mlflow.tracking.MlflowClient(uri)
    exps = client.search_experiments()
    return client, [r for e in exps for r in client.search_runs([e.experiment_id])]


def test_eval_logs_params_metrics_and_reports_to_the_tracking_uri(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                                  monkeypatch):
    from hardener.cli import main

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rep = tmp_path / "eval.json"
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "pgd", "--steps", "3", "--eps", "0.1", "--threat", "whitebox", "--no-checks",
                             "--report", str(rep), "--mlflow"])
    assert r.exit_code == 0, r.output
    assert "logged to MLflow: run" in r.output
    client, runs = _runs(uri)
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads(rep.read_text())["summary"]
    assert run.data.metrics["clean"] == pytest.approx(summary["clean"])
    assert run.data.metrics["robust"] == pytest.approx(summary["robust"])
    assert run.data.params["eps"] == "0.1" and run.data.params["attack_names"] == "pgd"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["eval.json"]


def test_patch_logs_into_the_callers_active_run_else_a_local_store(runner, tmp_path, tiny_ckpt, tiny_data,
                                                                  monkeypatch):
    from hardener.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.safetensors"
    args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--at", "block",
            "--out", str(out), "--mlflow", "--force", *FAST_PATCH]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    client, runs = _runs((tmp_path / "mlruns").as_uri())  # the default: ./mlruns
    assert len(runs) == 1 and "p.safetensors" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert runs[0].data.params["at"] == "block" and runs[0].data.tags["harden"] == "true"
    mlflow.set_tracking_uri((tmp_path / "mine").as_uri())
    with mlflow.start_run() as mine:  # a notebook's or pipeline step's own run: harden logs into it
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    got = mlflow.tracking.MlflowClient((tmp_path / "mine").as_uri()).get_run(mine.info.run_id)
    assert "clean" in got.data.metrics and got.data.params["at"] == "block"


def test_without_mlflow_installed_the_flag_is_one_line(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    from hardener.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--eps", "0.1", "--threat", "whitebox", "--no-checks", "--mlflow"])
    assert_input_error(r, "harden[mlflow]")


def test_pipeline_example_gates_a_ci_job(tmp_path, tiny_ckpt, tiny_data, tiny_test_data):
    """examples/pipeline.sh as a CI job runs it, on the tiny model: a gate it misses fails the job with exit 1, the
    report JSON is on stdout and the reports are kept."""
    env = {**os.environ, "HARDEN": f"{sys.executable} -m hardener", "MODEL": str(tiny_ckpt), "ARCH": ARCH,
           "MEAN": "0", "STD": "1", "DATA": str(tiny_data), "TEST": str(tiny_test_data), "OUT": str(tmp_path / "o"),
           "ATTACK": "pgd", "SAMPLES": "30", "PATCH_ARGS": " ".join(["--at", "block", *FAST_PATCH]),
           "EVAL_ARGS": "--steps 3 --no-checks --quiet",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    missed = subprocess.run(["bash", str(ROOT / "examples" / "pipeline.sh")], env={**env, "GATE": "robust=1.0"},
                            capture_output=True, text=True, timeout=300)
    assert missed.returncode == 1, missed.stderr[-2000:]
    assert "gate missed" in missed.stderr and (tmp_path / "o" / "eval.html").exists()
    rep = json.loads((tmp_path / "o" / "eval.stdout.json").read_text())
    assert rep["gates"]["missed"] and rep["summary"]["clean"] is not None
