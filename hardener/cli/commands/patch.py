"""`harden patch`: load, attach patches, train them (resumably), write the checkpoint, a quick (or full) report."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import api
from ... import attacks as A
from ... import data as hdata
from ...errors import InputError, RunError, UsageError
from ...evaluation import threats as E
from ...io.checkpoint import Manifest, save_patched, sha256_file
from ...io.resume import Saver, StopFlag, fingerprint
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
    eval_ds: hdata.Dataset | None = None  # the report's data: --eval-data, else held-out images of --data
    unused: torch.Tensor | None = None  # indices of --data neither trained, validated nor reported on
    ecfg: E.EvalConfig | None = None
    invocation: dict | None = None  # the command line and a command that reproduces the run (the report's)

    @property
    def quick(self) -> bool:
        return self.kw["report_budget"] == "quick"


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
            over = RUN.measure(plan.run)  # the trained model on its inference route, the run's device and threads
            if over:
                plan.run.hooks.warn(over)
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
                      world=world, saver=lambda r: _saver(plan, r), aside=lambda r: _aside(plan, r),
                      pool=lambda r: _pool(plan, r), report=lambda r: _report_plan(plan, r),
                      cache_dir=out_file.parent, keep_parent=True, library=False)
    plan.run = RUN.PatchRun(loaded.patched, ds_all, opts, recipe, device, hooks,
                            given=frozenset(f for f in kw if call.given(f)),
                            eval_elsewhere=bool(kw["eval_data"]), warnings=list(loaded.warnings))
    return plan


def _saver(plan: Plan, r: RUN.PatchRun) -> Saver:
    """The resumable state beside --out, for this base, data, patches, configuration, device and world."""
    loaded, world = plan.loaded, r.hooks.world
    saver = Saver(plan.out_file.with_name(plan.out_file.name + ".partial"), resume=plan.kw["resume"],
                  every_steps=plan.kw["save_every"],
                  fingerprint=fingerprint({"base": loaded.base.sha256, "data": r.train_ds.fingerprint(),
                                           "patches": loaded.patched.patch_specs(), "fit": F.config_record(r.cfg),
                                           "attack": r.spec.record(), "device": r.device.type,
                                           "val": r.val_ds.fingerprint() if r.val_ds is not None else None,
                                           "processes": world.size}),
                  readonly=not world.main)
    saver.check_start()
    return saver


def _aside(plan: Plan, r: RUN.PatchRun) -> list[str]:
    """After the split: the report's data, and the images of --data nothing uses (for --unlabeled rest)."""
    kw = plan.kw
    eval_samples = kw["eval_samples"] if kw["eval_samples"] is not None else (500 if plan.quick else 1000)
    plan.eval_ds, plan.unused, warnings = _report_data(plan.loaded, r.ds, r.split.rest, kw["eval_data"],
                                                       eval_samples, kw)
    return warnings


def _report_plan(plan: Plan, r: RUN.PatchRun) -> tuple[str, float]:
    """The post-training report, once the batch is settled: its line of the plan, its cost for the estimate."""
    kw = plan.kw
    ecfg = plan.ecfg = _report_config(plan.quick, r.spec, kw["norm"], kw["eval_steps"], r.cfg.batch_size, kw["seed"])
    return (f"report: {len(plan.eval_ds):,} images, {', '.join(ecfg.attacks)}"
            f"{f' {ecfg.steps} steps' if ecfg.steps else ''}, white-box then transfer",
            report_units(ecfg, len(plan.eval_ds)))


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
    kw, loaded, out_file, r = plan.kw, plan.loaded, plan.out_file, plan.run
    spec, device = r.spec, r.device
    n_params = _announce_written(loaded, r.cfg, out_file, r.train_seconds)
    t1 = time.time()
    with ProgressView(kw["quiet"]) as progress:
        result = E.evaluate(loaded.patched, plan.eval_ds, plan.ecfg, device, has_patches=True, progress=progress,
                            reference=r.parent.to(device) if r.parent is not None else None)
    report_seconds = time.time() - t1
    full_cmd = _full_eval_command(out_file, loaded, kw["eval_data"], spec)
    rep = R.build("patch", result, R.data_record(plan.eval_ds, r.warnings), R.attack_settings(result),
                  R.environment(str(device), kw["seed"], kw["deterministic"]),
                  {"checkpoint": str(out_file), "checkpoint_sha256": sha256_file(out_file), "eps": spec.eps,
                   "norm": spec.norm, "training": manifest.training, "patches": manifest.patches,
                   "train_seconds": r.train_seconds, "report_seconds": report_seconds,
                   "estimate": {k: v for k, v in r.estimate.items() if k.endswith("seconds")},
                   "trainable_parameters": n_params, "route": r.route, "processes": r.hooks.world.size,
                   "training_out_of_memory": r.info.get("out_of_memory", []),
                   "patch_cost": r.cost, "cost": r.inference.to_json() if r.inference else None,
                   "invocation": plan.invocation,
                   "epoch_log": [asdict(e) for e in r.logs], "cache": r.info, "base_modified": r.cfg.full,
                   "method": r.opts.method, "preset": r.preset.record() if r.preset else None,
                   "report_budget": {"budget": kw["report_budget"], "verdict": not plan.quick,
                                     "note": QUICK_NOTE if plan.quick else "reference budgets of the training attack",
                                     "full_evaluation": full_cmd}})
    R.render_table(rep, err_console)
    if not kw["quiet"]:
        what = "quick check, not a verdict" if plan.quick else "full"
        err_console.print(f"report: {what} ({report_seconds:.0f}s); training took {r.train_seconds:.0f}s. Full "
                          f"verdict:\n  {full_cmd}")
    if kw["report_path"]:
        written.append(kw["report_path"])
        R.write(rep, kw["report_path"])
    out(str(out_file))
    if kw["mlflow"]:
        track(kw, rep, [out_file, kw["report_path"]], f"harden patch {Path(kw['model']).name}")


QUICK_NOTE = ("quick check: white-box APGD-CE with a small step budget (and its transfer from the base) on a few "
              "hundred held-out images; a weak attack gives an upper bound of robust accuracy")


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False)


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {text}")


def _report_config(quick: bool, spec: A.AttackSpec, norm: str, eval_steps: int | None, batch_size: int,
                   seed: int) -> E.EvalConfig:
    """The post-training report: quick (white-box APGD-CE, 20 steps, first; then its transfer) or full (the
    training attack at its reference budget in both threat models)."""
    return E.EvalConfig(attacks=["apgd-ce"] if quick else [spec.name], eps=spec.eps, norm=norm,
                        steps=(eval_steps or 20) if quick else eval_steps, threats=("whitebox", "transfer"),
                        batch_size=max(batch_size, 256), seed=seed, checks=False)


def report_units(ecfg: E.EvalConfig, n: int) -> float:
    """Forward-pass equivalents of the post-training report, per image and iterative attack. Three attacks run
    (on the base, on the patched model, on the base again for the transfer examples), but an attack step has no
    parameter gradients, and evaluation's APGD stops on a sample once it is broken: the base's own attack (a base
    every attack breaks) costs next to nothing, the patched model's less than its steps. Together about 4/3 of a
    training-step unit per step; measured with APGD's early stop, 2 threads: 7.5 s estimated for the demo's 8.7 s,
    29 s for the 10% run's 25 s (it was 2 units before the early stop: 11 and 42 s)."""
    steps = ecfg.steps or A.info(ecfg.attacks[0]).steps
    return n * len(ecfg.attacks) * (4 * (steps + 1) + 6)


def _announce_written(loaded, cfg: F.FitConfig, out_file: Path, train_seconds: float) -> int:
    n_params = sum(p.numel() for p in loaded.patched.patch_parameters())
    if cfg.full:
        n_params += sum(p.numel() for p in loaded.patched.model.parameters())
        err_console.print(f"wrote {out_file} (method {cfg.method}: every base weight fine-tuned, {n_params:,} "
                          f"parameters; not a patch), trained in {train_seconds:.0f}s")
    else:
        err_console.print(f"wrote {out_file} ({len(loaded.patched.sites)} patch(es), {n_params:,} parameters, "
                          f"trained in {train_seconds:.0f}s)")
    return n_params


def _full_eval_command(out_file: Path, loaded, eval_data: str | None, spec: A.AttackSpec) -> str:
    import shlex

    parts = ["harden", "eval", str(out_file), "--data", eval_data or "TEST_DATA", "--eps", repr(spec.eps),
             "--norm", spec.norm, "--attack", "apgd-ce,apgd-dlr,square", "--threat", "all"]

    if loaded.base.arch and not is_hf_arch(loaded.base.arch):  # a Hugging Face base rebuilds from its manifest
        parts += ["--arch", loaded.base.arch]
        if loaded.base.arch_kwargs:
            parts += ["--arch-kwargs", json.dumps(loaded.base.arch_kwargs, sort_keys=True)]
    return " ".join(shlex.quote(p) for p in parts)


def _pool(plan: Plan, r: RUN.PatchRun) -> hdata.Dataset:
    """--unlabeled: the images to pseudo-label, "rest" the images of --data nothing else uses."""
    if r.opts.unlabeled == "rest":
        if len(plan.unused) == 0:
            raise InputError("--unlabeled rest: no images of --data are left outside the training, validation and "
                             "report images; give a smaller --subset or --eval-samples, or a folder or tensor file")
        pool = r.ds.take(plan.unused)
        pool.source = f"{r.ds.source} (rest, labels ignored)"
        return pool
    return load_data(plan.loaded, r.opts.unlabeled, data_options(plan.kw), labels_required=False)


def _report_data(loaded, ds_all, rest_idx, eval_data, eval_samples, kw):
    """The data of the patch report (--eval-data, else part of --data outside the subset), the indices of --data
    it left unused, the warnings."""
    warnings = []
    unused = rest_idx
    if eval_data:
        eval_ds = load_data(loaded, eval_data, data_options(kw))
        hdata.check_labels(eval_ds, loaded.spec.num_classes)
    else:
        if len(rest_idx) == 0:
            raise InputError("no report data: --data has nothing left outside the training and validation images; "
                             "pass --eval-data, a smaller --subset or a larger --holdout")
        eval_ds = ds_all.take(rest_idx)
        warnings.append("report data is held-out images of --data; the base may have been trained on them, so its "
                        "clean accuracy there may be optimistic")
    if eval_samples and eval_samples < len(eval_ds):
        idx, left = hdata.stratified_split(eval_ds.labels, int(eval_samples), kw["seed"])
        eval_ds = eval_ds.take(idx)
        if not eval_data:
            unused = rest_idx[left]
    elif not eval_data:
        unused = rest_idx[:0]
    return eval_ds, unused, warnings
