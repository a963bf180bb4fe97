"""`harden eval`: attacks in each threat model on a plain or patched checkpoint, the per-sample worst case, the
sanity checks, gates (`--fail-under`), reports; resumable, and shardable over processes (torchrun)."""
from __future__ import annotations

from pathlib import Path

import torch

from ... import api
from ... import attacks as A
from ... import data as hdata
from ...errors import InputError, RunError, ThresholdError, UsageError
from ...evaluation import run as EV
from ...io.checkpoint import sha256_file
from ...io.resume import EvalStore, state_folder
from ...io.session import finish_spec, load_data, load_model, load_parent
from ...options import validate as V
from ...reports import report as R
from ...reports.tracking import require
from ...runtime import distributed as D
from ...runtime.console import ProgressView, err_console, out
from ...training import run as RUN
from ..signals import outputs_or_none
from . import (
    Call,
    adaptive,
    data_options,
    invocation,
    model_arg,
    model_options,
    start,
    track,
)


def run(call: Call) -> None:
    """The whole command: checks, loading, the library's run (`evaluation.run.eval_run`), gates, reports, MLflow."""
    kw = call.params
    model, data, thresholds, threats, raw, names, sweep = _check(call)
    world, device = start(kw)
    loaded, reference, surrogate, ds = _load(model, data, kw, device)
    cfg = EV.config(raw or ["apgd-ce"], kw["eps"], norm=kw["norm"], steps=kw["steps"],
                    restarts=kw["restarts"], queries=kw["queries"], threats=threats, batch_size=kw["batch_size"],
                    seed=kw["seed"], eps_sweep=sweep, checks=not kw["no_checks"],
                    smooth_grad=A.parse_smooth_grad(kw["smooth_grad"]), precision=kw["precision"])
    hooks = EV.Hooks(say=RUN.silent if kw["quiet"] else _say, warn=_warn, progress=ProgressView(kw["quiet"]),
                     world=world)
    ev = EV.EvalRun(loaded.patched, ds, cfg, device, loaded.has_patches, hooks,
                    subset=hdata.parse_subset(kw["subset"]), max_samples=kw["max_samples"],
                    allow_low_accuracy=kw["allow_low_accuracy"], reference=reference, surrogate=surrogate,
                    base_cache=Path(kw["base_cache"]) if kw["base_cache"] else None, deterministic=kw["deterministic"],
                    notes=list(loaded.warnings))
    if kw["defense"] == "adaptive":
        EV.prepare(ev)
        if world.active:
            raise InputError("--defense adaptive runs in one process: start it without torchrun")
        adaptive.evaluate(model, loaded, ev.ds, names, kw, device)
        return
    model_sha = sha256_file(Path(model))
    hooks.store = lambda r: _store(r, model_sha, kw)
    ev.extra = _extra(model, model_sha, loaded, kw, invocation.record("eval", call))
    stopped = lambda: EV.stopped(ev.store, "rerun the same command with --resume",  # noqa: E731
                                 "pass --state-dir DIR or --report to make an evaluation resumable")
    with outputs_or_none(stopped) as written:
        EV.eval_run(ev)
        if ev.report is None:  # another rank of a sharded run: rank 0 reports (and clears every rank's state after)
            D.finish(world)
            return
        rep = _report(ev.report, thresholds, kw, written)
    ev.store.clear()
    D.clear_other_states(ev.store.path, world)  # the other ranks' state too, now that the report is written
    D.finish(world)
    if kw["as_json"]:
        out(R.json_text(rep))
    missed = ThresholdError("--fail-under missed: " + "; ".join(rep["gates"]["missed"])) \
        if rep["gates"]["missed"] else None
    if kw["mlflow"]:
        try:
            track(kw, rep, list(kw["report_paths"]), f"harden eval {Path(model).name}")
        except RunError as e:
            if missed is None:
                raise
            err_console.print(f"Error: {e.message}", highlight=False, markup=False)  # the gate's exit code wins
    if missed is not None:
        raise missed


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False)


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {text}", highlight=False)


def _check(call: Call):
    """Option errors before any loading: the data, gates, threat models, attacks, eps sweep, output paths."""
    kw = call.params
    model = model_arg(kw["model"])
    data = kw["data"] or kw["eval_data"]
    if not data:
        raise UsageError("missing --data (or `eval_data` in harden.toml)")
    if kw["mlflow"]:
        if kw["defense"] == "adaptive":
            raise InputError("--mlflow does not log --defense adaptive evaluations: log its --report yourself")

        require()
    thresholds = R.parse_fail_under(kw["fail_under"])
    threats = api.parse_threats(kw["threat"], "--threat")
    if "surrogate" in [t.strip() for t in kw["threat"].split(",")] and not kw["surrogate"]:
        raise InputError("--threat surrogate needs --surrogate CHECKPOINT (a model to transfer attacks from)")
    for p in kw["report_paths"]:
        R.check_path(p)
    call.check_run([("--report", p) for p in kw["report_paths"]], kw["force"])
    raw = list(kw["attack_names"]) + ([A.SUITE_VERSIONS[kw["suite"]]] if kw["suite"] else [])
    names = A.parse_attack_list(raw or ["apgd-ce"])
    if kw["defense"] != "adaptive":
        R.check_gate_attacks(thresholds, names, threats, kw["allow_weak_gate"], kw["steps"])
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], what="--eps")
    sweep = [A.check_eps(A.parse_eps(e), kw["norm"], what="--eps-sweep", zero=True)
             for e in kw["eps_sweep"].split(",")] if kw["eps_sweep"] else None
    return model, data, thresholds, threats, raw, names, sweep


def _load(model: str, data: str, kw: dict, device: torch.device):
    """The model (on --route), its --parent, the data (its warnings shown), the --surrogate."""
    loaded = load_model(model, model_options(kw))
    reference = load_parent(loaded, kw["parent"], model_options(kw))
    if kw["route"]:
        if not loaded.patched.has_auxbn:
            raise InputError(f"--route {kw['route']}: '{model}' has no auxiliary BNs")
        loaded.patched.set_route(kw["route"])
    ds = load_data(loaded, data, data_options(kw))
    finish_spec(loaded, ds, device)
    for w in loaded.warnings:
        _warn(w)
    surrogate = _load_surrogate(kw["surrogate"], kw, ds, device)
    return loaded, reference, surrogate, ds


def _load_surrogate(path: str | None, kw: dict, ds, device):
    """The --surrogate model (plain or harden checkpoint, the model's --arch), taking [0, 1] pixels, in eval mode."""
    if not path:
        return None
    V.regular_input(path, "--surrogate")
    loaded = load_model(path, model_options(kw))
    finish_spec(loaded, ds, device)
    return loaded.patched.eval()


def _store(run: EV.EvalRun, model_sha: str, kw: dict) -> EvalStore:
    """The evaluation's resumable state (per rank): in --state-dir, HARDEN_CACHE_DIR or beside the first --report."""
    return EV.state_store(run, model_sha, state_folder(kw["state_dir"], list(kw["report_paths"])), kw["resume"],
                          parent=kw["parent"],
                          surrogate_sha=sha256_file(Path(kw["surrogate"])) if kw["surrogate"] else None)


def _extra(model: str, model_sha: str, loaded, kw: dict, how: dict | None) -> dict:
    """The command line's fields of the report: the checkpoint, how it was run, the surrogate, what the manifest
    says of the patches and their training."""
    extra = {"checkpoint": model, "checkpoint_sha256": model_sha, "invocation": how}
    if kw["surrogate"]:
        extra["surrogate"] = {"checkpoint": kw["surrogate"], "sha256": sha256_file(Path(kw["surrogate"]))}
    if loaded.manifest is not None:
        extra["patches"] = loaded.manifest.patches
        extra["training"] = loaded.manifest.training
        extra["base_modified"] = loaded.manifest.base_modified
        if loaded.manifest.cost:  # the counted cost, kept if the run cannot measure it here
            extra["cost"] = loaded.manifest.cost
        if loaded.patched.has_auxbn:
            extra["route"] = loaded.patched.current_route
    return extra


def _report(rep: dict, thresholds: dict, kw: dict, written: list) -> dict:
    """The report's gates; the report rendered on stderr, written to each --report (each listed in `written`
    first)."""
    missed = R.gate(rep, thresholds)
    rep["gates"] = {"thresholds": thresholds, "missed": missed}
    R.summarise(rep)
    R.render_table(rep, err_console)
    if thresholds and not missed:
        err_console.print(R.gates_passed_line(rep, thresholds), highlight=False)
    for p in kw["report_paths"]:
        written.append(p)  # before the write: an interrupt just as the file lands removes it too
        R.write(rep, p)
    return rep
