"""How a run was started, for its report: the command line (the options it set itself) and a command that
reproduces the run (every option whose value is not the built-in default, those of a config file or a preset
included), with the working directory its relative paths are relative to."""
from __future__ import annotations

import os
import shlex
from typing import Any

from .. import options as O
from . import Call

SPECS = {"patch": O.patch_specs, "eval": lambda: O.EVAL}  # patch: with the kinds and methods registered now
SKIP = {"resume", "force", "config"}  # how to continue or overwrite, not what the run is


def _dest(spec: O.Opt) -> str:
    named = [d for d in spec.decls if not d.startswith("-")]
    return named[0] if named else spec.decls[0].split("/")[0].lstrip("-").replace("-", "_")


def _args(spec: O.Opt, value: Any) -> list[str]:
    """The command-line words that give `value` to the option of `spec` ([] for its default or nothing)."""
    flag = spec.decls[0]
    if "/" in flag:  # --cache/--no-cache
        on, off = flag.split("/")
        return [] if value == spec.kwargs.get("default") else [on if value else off]
    if spec.kwargs.get("is_flag"):
        return [flag] if value else []
    values = list(value) if spec.kwargs.get("multiple") else [value]
    if value is None or value == spec.kwargs.get("default") or values == []:
        return []
    return [w for v in values for w in (flag, str(v))]


def record(command: str, call: Call) -> dict:
    """The report's `invocation` block: `command_line`, `reproduce` and `working_directory`."""
    kw = call.params
    given, every = [], []
    for spec in SPECS[command]():
        name = _dest(spec)
        if name in SKIP or name not in kw:
            continue
        words = _args(spec, kw[name])
        every += words
        if call.given(name):
            given += words
    head = ["harden", command, str(kw.get("model") or "")]
    return {"command_line": shlex.join(head + given), "reproduce": shlex.join(head + every),
            "working_directory": os.getcwd()}
