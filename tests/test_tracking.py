"""--mlflow (issue 33): parameters, the numeric summary and files logged to a real local MLflow store, read back with
MLflow's own client; the CI-gate example script run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardener.reports.tracking import numeric_metrics

from conftest import ARCH, FAST_PATCH, assert_input_error

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
    from hardener.cli.app import main

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


def test_patch_logs_into_a_local_store_else_a_child_of_the_callers_run(runner, tmp_path, tiny_ckpt, tiny_data,
                                                                  monkeypatch):
    from hardener.cli.app import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client: harden sets it only inside
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.safetensors"
    args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--at", "block",
            "--out", str(out), "--mlflow", "--force", *FAST_PATCH]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    client, runs = _runs((tmp_path / "mlruns").as_uri())  # the default: ./mlruns
    assert len(runs) == 1 and "p.safetensors" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert runs[0].data.params["at"] == "block" and runs[0].data.tags["harden"] == "true"
    mine_uri = (tmp_path / "mine").as_uri()
    mlflow.set_tracking_uri(mine_uri)
    try:
        with mlflow.start_run() as mine:  # a notebook's own run: each harden command logs a child run of it
            for _ in range(2):  # the same command twice: no parameter clash, the caller's run stays open
                r = runner.invoke(main, args)
                assert r.exit_code == 0, r.output
            assert mlflow.active_run().info.run_id == mine.info.run_id
    finally:
        mlflow.set_tracking_uri(None)  # the notebook's setting, not the next test's
    client = mlflow.tracking.MlflowClient(mine_uri)
    children = client.search_runs([mine.info.experiment_id], f"tags.mlflow.parentRunId = '{mine.info.run_id}'")
    assert len(children) == 2 and all("clean" in c.data.metrics and c.data.params["at"] == "block" for c in children)
    assert client.get_run(mine.info.run_id).info.status == "FINISHED"  # ended by its own `with`, not by harden


def test_a_pipelines_run_id_gets_child_runs_and_stays_open(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                          monkeypatch):
    """MLFLOW_RUN_ID (what pipeline tools set): eval logs a child run; the pipeline's run is neither taken over nor
    ended, and the variable is still set afterwards."""
    from hardener.cli.app import main

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.create_run(client.create_experiment("pipeline"))
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm", "--eps",
            "0.1", "--threat", "whitebox", "--no-checks", "--mlflow"]
    for _ in range(2):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    assert os.environ["MLFLOW_RUN_ID"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)


def test_an_unreachable_server_fails_after_the_output_and_a_missed_gate_keeps_exit_1(runner, tmp_path, patched_ckpt,
                                                                                    tiny_test_data, monkeypatch):
    from hardener.cli.app import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd", "--steps",
            "3", "--eps", "0.1", "--threat", "whitebox", "--no-checks", "--mlflow", "--json"]
    r = runner.invoke(main, [*args, "--fail-under", "robust=1.0"])
    assert r.exit_code == 1 and "could not log to MLflow" in r.output and "--fail-under missed" in r.output
    r = runner.invoke(main, args)
    assert r.exit_code == 3 and "could not log to MLflow" in r.output and '"summary"' in r.output


def test_without_mlflow_installed_the_flag_is_one_line(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    from hardener.cli.app import main

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
