"""What each `harden` command does, without click: `cli/app.py` parses the options into a dict and calls the command's
`run(call)` here, one module per command. Results go to stdout and everything else to stderr (`console`); errors
are `HardenError`s (`UsageError` for a missing argument), which the command line turns into exit codes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ...errors import UsageError

if TYPE_CHECKING:  # imported where used: the command line imports this package, and --help must not import torch
    from ...io.session import DataOptions, ModelOptions


def _no_check(outputs: list[tuple[str, Any]], force: bool) -> None:
    """No boundary checks (a call from Python, where nothing was parsed)."""


@dataclass
class Call:
    """One invocation of a command: the options by parameter name (every one present, defaults filled in), the
    boundary checks of the command line (option values, output paths against inputs; `boundary.check_run`), and
    which options the command line set itself."""

    params: dict[str, Any]
    check_run: Callable[[list[tuple[str, Any]], bool], None] = _no_check
    given: Callable[[str], bool] = field(default=lambda name: False)


def model_arg(model: str | None) -> str:
    if not model:
        raise UsageError("missing MODEL (a checkpoint path, or `model` in harden.toml)")
    return model


def model_options(kw: dict) -> ModelOptions:
    from ...io.session import ModelOptions

    return ModelOptions(**{k: kw[k] for k in ModelOptions.__dataclass_fields__})


def data_options(kw: dict) -> DataOptions:
    from ...io.session import DataOptions

    return DataOptions(**{k: kw[k] for k in DataOptions.__dataclass_fields__})


def start(kw: dict):
    """Seed, determinism, and this process's place in a torchrun launch: (world, device). Every process but rank 0
    is quiet (rank 0 reports)."""
    import torch

    from ...io.session import pick_device, set_deterministic
    from ...runtime import distributed as D

    torch.manual_seed(kw["seed"])
    set_deterministic(kw["deterministic"])
    world = D.world()
    device = D.init(world, pick_device(kw["device"]))
    if not world.main:
        kw["quiet"] = True
    return world, device


def track(kw: dict, rep: dict, files: list, name: str) -> None:
    """--mlflow: the run's options, the report's numeric `summary` (`report.summarise`) and the written
    files to MLflow (`hardener.reports.tracking`), one line on stderr saying where."""
    from ...reports.tracking import cli_params, log_run
    from ...runtime.console import err_console

    run_id, uri = log_run(cli_params(kw), rep["summary"], files, run_name=name,
                          tags={"harden.command": str(rep.get("command", ""))})
    if not kw.get("quiet"):
        err_console.print(f"logged to MLflow: run {run_id} at {uri}", highlight=False, markup=False)
