"""`harden patch`: load, attach patches, train them (resumably), write the checkpoint, a quick (or full) report."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ... import api
from ... import attacks as A
from ... import data as hdata
from ...errors import InputError, RunError, UsageError
from ...io.checkpoint import Manifest, save_patched, sha256_file
from ...io.resume import Saver, StopFlag
from ...io.session import Loaded, finish_spec, load_data, load_model
from ...model.hf import is_hf_arch
from ...options.patch_options import check_teacher
from ...options.recipe import holdout_size, load_preset, parse_methods
from ...patches import cost as C
from ...reports import report as R
from ...reports.tracking import require
from ...runtime import distributed as D
from ...runtime.console import ProgressView, announce, err_console, out
from ...training import fit as F
from ...training import report as TR
from ...training import run as RUN
from ..signals import outputs_or_none
from . import Call, data_options, invocation, model_arg, model_options, start, track


def default_out(model: str) -> Path:
    p = Path(model)
    return p.with_name(f"{p.stem}.hardened.safetensors")


@dataclass
class Plan:
    """What a `harden patch` run works with: the library's run (`training.run.PatchRun`) and what the command line adds."""

    kw: dict
    out_file: Path
    loaded: Loaded
    infos: list  # the layer table of the base on --data (session.finish_spec)
    run: RUN.PatchRun | None = None
    invocation: dict | None = None  # the command line and a command that reproduces the run (the report's)


def run(call: Call) -> None:
    """The whole command: checks, loading, the library's run (`training.run.patch_run`), the checkpoint, the report."""
    plan = _plan(call)
    plan.invocation = invocation.record("patch", call)
    world = plan.run.hooks.world
    RUN.patch_run(plan.run, plan.infos)
    if not world.main:  # another process of `torchrun ... -m hardener patch`: rank 0 writes and reports
        D.finish(world)
        return
    with outputs_or_none(lambda: _stopped(plan)) as written:
        try:
            manifest = _write(plan, written)
            D.finish(world)
            _report(plan, manifest, written)
        except Exception:
            if written:  # failed after the checkpoint was written: it stands, and no state is needed to redo it
                plan.run.saver.clear()
            raise
    plan.run.saver.clear()  # the resumable state goes once every output is written


def _stopped(plan: Plan) -> str:
    """Interrupted after training (writing, timing or reporting): what was written is gone, the trained state kept."""
    return (f"interrupted after training: this run's outputs were removed, its trained state is kept in "
            f"'{plan.run.saver.path}'; rerun the same command with --resume to write the checkpoint and its report "
            "without training again")


def _check(call: Call) -> tuple[str, Path]:
    """Option errors come before any loading."""
    kw = call.params
    model = model_arg(kw["model"])
    if not kw["data"]:
        raise UsageError("missing --data (training data, or `data` in harden.toml)")
    out_file = Path(kw["out_path"]) if kw["out_path"] else default_out(model)
    if kw["mlflow"]:
        require()
    if kw["report_path"]:
        R.check_path(kw["report_path"])
    call.check_run([("--out", out_file), ("--report", kw["report_path"])], kw["force"])
    return model, out_file


def _plan(call: Call) -> Plan:
    """Checks, loading, and the run with the command line's hooks."""
    kw = call.params
    model, out_file = _check(call)
    recipe = load_preset(kw["preset"]) if kw["preset"] else None
    opts = api.PatchOptions.of(kw, method_given=call.given("method"))  # --patch/--train as --method/--at say them
    parse_methods(opts.method, opts.bn, opts.at or opts.at_regex)
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], what="--eps")
    A.expand([kw["attack_name"]])  # unknown names fail before any loading
    A.parse_smooth_grad(kw["smooth_grad"])
    hdata.parse_subset(kw["subset"])
    holdout_size(kw["holdout"], 1)  # checked even where --subset or --eval-data leaves nothing to hold out
    check_teacher(kw["loss_name"], kw["teacher"])
    C.parse_budget(kw["budget"])
    if kw["select_on"] and kw["validate"]:
        raise InputError("--select-on and --validate both hold out a validation split: give one")
    progress = ProgressView(kw["quiet"])
    world, device = start(kw)
    loaded = load_model(model, model_options(kw), allow_patched=False)
    ds_all = load_data(loaded, kw["data"], data_options(kw))
    infos = finish_spec(loaded, ds_all, device)
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], math.prod(loaded.spec.shape), what="--eps")
    announce(ds_all, kw["quiet"])
    plan = Plan(kw, out_file, loaded, infos)
    hooks = RUN.Hooks(say=RUN.silent if kw["quiet"] else _say, warn=_warn, progress=progress, stop=StopFlag(),
                      world=world, saver=lambda r: _saver(plan, r),
                      load_data=lambda spec: load_data(loaded, spec, data_options(kw), labels_required=False),
                      cache_dir=out_file.parent, keep_parent=True)
    post = TR.PostReport(kw["report_budget"], load_data(loaded, kw["eval_data"], data_options(kw)) if kw["eval_data"]
                         else None, kw["eval_samples"], kw["eval_steps"])
    plan.run = RUN.PatchRun(loaded.patched, ds_all, opts, recipe, device, hooks,
                            given=frozenset(f for f in kw if call.given(f)), post_report=post,
                            warnings=list(loaded.warnings))
    return plan


def _saver(plan: Plan, r: RUN.PatchRun) -> Saver:
    """The resumable state beside --out."""
    return RUN.saver_at(plan.out_file.with_name(plan.out_file.name + ".partial"), r, plan.loaded.base.sha256,
                        plan.kw["resume"], plan.kw["save_every"])


def _write(plan: Plan, written: list) -> Manifest:
    """The checkpoint, atomically (the resumable state stays until the report is written too)."""
    loaded, r = plan.loaded, plan.run
    manifest = Manifest(
        arch=loaded.base.arch, arch_kwargs=loaded.base.arch_kwargs, input=loaded.spec.to_json(),
        patches=loaded.patched.patch_specs(), base_sha256=loaded.base.sha256, training=r.record.to_dict(),
        route=r.route, base_modified=r.cfg.full, parent_sha256=loaded.base.sha256 if r.cfg.full else "",
        cost=r.inference.to_json(latency=False) if r.inference else {},
    )
    written.append(plan.out_file)  # before the write: an interrupt just as the file lands removes it too
    try:
        save_patched(plan.out_file, loaded.patched.to("cpu"), manifest)
    except RunError as e:
        written.remove(plan.out_file)
        if r.saver.path.exists():
            raise RunError(f"{e.message}; the trained state is kept in '{r.saver.path}': fix that and rerun the same "
                           "command with --resume to write it without training again") from None
        raise
    loaded.patched.to(r.device)
    return manifest


def _report(plan: Plan, manifest: Manifest, written: list) -> None:
    """The library's post-training report (`training.report.build`), with the checkpoint and the command line; shown,
    written, tracked."""
    kw, loaded, out_file, r = plan.kw, plan.loaded, plan.out_file, plan.run
    _announce_written(loaded, r.cfg, out_file, r.train_seconds)
    full_cmd = _full_eval_command(out_file, loaded, kw["eval_data"], r.spec)
    rep = TR.build(r, ProgressView(kw["quiet"]), deterministic=kw["deterministic"],  # entered by the run, once
                 extra={"checkpoint": str(out_file), "checkpoint_sha256": sha256_file(out_file),
                        "invocation": plan.invocation, "report_budget": {"full_evaluation": full_cmd}})
    R.render_table(rep, err_console)
    if not kw["quiet"]:
        what = "quick check, not a verdict" if r.post_report.quick else "full"
        err_console.print(f"report: {what} ({r.post_report.seconds:.0f}s); training took {r.train_seconds:.0f}s. "
                          f"Full verdict:\n  {full_cmd}")
    if kw["report_path"]:
        written.append(kw["report_path"])
        R.write(rep, kw["report_path"])
    out(str(out_file))
    if kw["mlflow"]:
        track(kw, rep, [out_file, kw["report_path"]], f"harden patch {Path(kw['model']).name}")


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False)


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {text}")


def _announce_written(loaded, cfg: F.FitConfig, out_file: Path, train_seconds: float) -> None:
    n_params = TR.trainable_parameters(loaded.patched, cfg.full)
    if cfg.full:
        err_console.print(f"wrote {out_file} (method {cfg.method}: every base weight fine-tuned, {n_params:,} "
                          f"parameters; not a patch), trained in {train_seconds:.0f}s")
    else:
        err_console.print(f"wrote {out_file} ({len(loaded.patched.sites)} patch(es), {n_params:,} parameters, "
                          f"trained in {train_seconds:.0f}s)")


def _full_eval_command(out_file: Path, loaded, eval_data: str | None, spec: A.AttackSpec) -> str:
    import shlex

    parts = ["harden", "eval", str(out_file), "--data", eval_data or "TEST_DATA", "--eps", repr(spec.eps),
             "--norm", spec.norm, "--attack", "apgd-ce,apgd-dlr,square", "--threat", "all"]

    if loaded.base.arch and not is_hf_arch(loaded.base.arch):  # a Hugging Face base rebuilds from its manifest
        parts += ["--arch", loaded.base.arch]
        if loaded.base.arch_kwargs:
            parts += ["--arch-kwargs", json.dumps(loaded.base.arch_kwargs, sort_keys=True)]
    return " ".join(shlex.quote(p) for p in parts)

