"""Experiment tracking: a run's parameters, its numeric summary and its files logged to MLflow (`--mlflow`).

Where to: the caller's active MLflow run if there is one (a notebook or a pipeline step that opened it), else a new
run at `MLFLOW_TRACKING_URI`, else a local file store `./mlruns` (MLflow keeps its file store in maintenance mode and
refuses it unless `MLFLOW_ALLOW_FILE_STORE=true`, which harden sets for that default only; point
`MLFLOW_TRACKING_URI` at a tracking server for a team). MLflow is an extra: `pip install 'harden[mlflow]'`
(mlflow-skinny, the client without the server)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError, RunError

MAX_PARAM = 6000  # MLflow's limit on a parameter's value


def numeric_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) summary, keys joined by '.'; lists, strings, None and booleans are left out
    (metrics are numbers: `mlflow.log_metrics` refuses anything else)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _client():
    try:
        import mlflow
    except ImportError:
        raise InputError("--mlflow needs MLflow's client: pip install 'harden[mlflow]' (or mlflow-skinny)") from None
    return mlflow


def log_run(params: dict[str, Any], summary: dict, files: Iterable[str | Path] = (), run_name: str | None = None,
            tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log `params` (as strings), the numeric part of `summary` and the existing `files` to MLflow; returns
    (run id, tracking URI). An MLflow failure (server unreachable, store unwritable) is a RunError: what harden wrote
    is on disk already."""
    mlflow = _client()
    try:
        active = mlflow.active_run()
        if active is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        run = active or mlflow.start_run(run_name=run_name)
        try:
            mlflow.log_params({k: str(v)[:MAX_PARAM] for k, v in params.items() if v is not None})
            mlflow.log_metrics(numeric_metrics(summary))
            mlflow.set_tags({"harden": "true", **(tags or {})})
            for f in files:
                if f and Path(f).is_file():
                    mlflow.log_artifact(str(f))
        finally:
            if active is None:
                mlflow.end_run()
        return run.info.run_id, mlflow.get_tracking_uri()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure of the tracking backend, in one line
        raise RunError(f"could not log to MLflow ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                       "checkpoint and reports are written") from None


def cli_params(kw: dict) -> dict[str, Any]:
    """A command's options as MLflow parameters: the ones given a value, flags and paths included."""
    return {k: v if not isinstance(v, (list, tuple)) else ",".join(map(str, v)) for k, v in kw.items()
            if v not in (None, (), []) and k != "mlflow"}
