"""Experiment tracking: a run's parameters, its numeric summary and its files logged to MLflow (`--mlflow`).

Where to: a new run, the child of the caller's run if there is one (the library's active run, or MLFLOW_RUN_ID as
pipeline tools set it), at the tracking URI the caller set (`MLFLOW_TRACKING_URI`, `mlflow.set_tracking_uri`), else
in a local file store `./mlruns` (MLflow keeps its file store in maintenance mode and refuses it unless
`MLFLOW_ALLOW_FILE_STORE=true`, which harden sets for that default only, for the call; point `MLFLOW_TRACKING_URI` at
a tracking server for a team). MLflow is an extra: `pip install 'harden[mlflow]'`
(mlflow-skinny, the client without the server)."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, RunError

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


def require():
    """MLflow's client, or one line saying how to install it (checked before a run starts its work)."""
    try:
        import mlflow
    except ImportError:
        raise InputError("--mlflow needs MLflow's client: pip install 'harden[mlflow]' (or mlflow-skinny)") from None
    return mlflow


# A tracking server that does not answer fails the logging in seconds, not after MLflow's default retries (minutes).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@contextlib.contextmanager
def _environment(default_store: bool):
    """MLflow's settings for one logging call, restored after it: short HTTP retries; the local file store allowed
    where it is harden's default; the caller's MLFLOW_RUN_ID kept (start_run would take it over and remove it)."""
    keys = [*HTTP_SETTINGS, "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in HTTP_SETTINGS.items() if k not in os.environ})
    if default_store:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield saved["MLFLOW_RUN_ID"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_run(params: dict[str, Any], summary: dict, files: Iterable[str | Path] = (), run_name: str | None = None,
            tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log `params` (as strings), the numeric part of `summary` and the existing `files` to a new MLflow run; returns
    (run id, tracking URI). Inside a run the caller opened (the library's active run, or MLFLOW_RUN_ID as pipeline
    tools set it) the new run is its child, so several harden commands log into one pipeline run without clashing
    parameters, and the caller's run is left open. An MLflow failure (server unreachable, store unwritable) is a
    RunError, and the run harden opened is marked FAILED: what harden wrote is on disk already."""
    mlflow = require()
    from mlflow.tracking import is_tracking_uri_set

    active = mlflow.active_run()
    default_store = active is None and not is_tracking_uri_set()  # neither set_tracking_uri nor the variable
    with _environment(default_store) as pipeline_run:
        if default_store:  # through the variable, restored after: the process's MLflow settings stay the caller's
            os.environ["MLFLOW_TRACKING_URI"] = Path("mlruns").resolve().as_uri()
        parent = active.info.run_id if active else pipeline_run
        try:  # a child lives in its parent's experiment
            experiment = mlflow.tracking.MlflowClient().get_run(parent).info.experiment_id if parent else None
            run = mlflow.start_run(run_name=run_name, nested=active is not None, parent_run_id=parent,
                                   experiment_id=experiment)
        except Exception as e:  # noqa: BLE001 -- any failure of the tracking backend, in one line
            raise _failed(e) from None
        status = "FAILED"
        try:
            mlflow.log_params({k: str(v)[:MAX_PARAM] for k, v in params.items() if v is not None})
            mlflow.log_metrics(numeric_metrics(summary))
            mlflow.set_tags({"harden": "true", **(tags or {})})
            for f in files:
                if f and Path(f).is_file():
                    mlflow.log_artifact(str(f))
            status = "FINISHED"
        except Exception as e:  # noqa: BLE001
            raise _failed(e) from None
        finally:
            try:
                mlflow.end_run(status)
            except Exception:  # noqa: BLE001 -- the first error is the one to report
                pass
        return run.info.run_id, mlflow.get_tracking_uri()


def _failed(e: Exception) -> RunError:
    first = (str(e).splitlines() or [""])[0][:200]
    return RunError(f"could not log to MLflow ({type(e).__name__}: {first}); the checkpoint and reports are written")


def cli_params(kw: dict) -> dict[str, Any]:
    """A command's options as MLflow parameters: the ones given a value, flags and paths included."""
    return {k: v if not isinstance(v, (list, tuple)) else ",".join(map(str, v)) for k, v in kw.items()
            if v not in (None, (), []) and k != "mlflow"}
