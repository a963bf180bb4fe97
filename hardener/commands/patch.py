"""`harden patch`: load, attach patches, train them (resumably), write the checkpoint, a quick (or full) report."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .. import api, attacks as A, data as hdata, distributed as D, evaluation as E, fit as F, methods as M
from .. import cost as C, report as R
from ..checkpoint import Manifest, save_patched, sha256_file
from ..console import ProgressView, announce, err_console, out
from ..errors import InputError, RunError, UsageError
from ..layers import describe_cost, patch_cost
from ..patches.attach import Disabled
from ..recipe import Split, load_preset, parse_methods, split_for_training
from ..resume import Saver, StopFlag, fingerprint
from ..session import Loaded, check_accuracy, finish_spec, load_data, load_model
from . import Call, data_options, invocation, model_arg, model_options, start, track

COSTLY = 1.0  # patches with more parameters than this fraction of the base's get a warning (the base itself)
COSTLY_MACS = 3.0  # ... and with more multiply-adds than this multiple of the base's (inference over 4x the base's)
# Fewer optimiser steps than this and patches underfit (1% of Fashion-MNIST at batch 128 and 10 epochs:
# 50 steps, and fixers fitted 19% of their training attack).
FEW_STEPS = 200
PATCH_FIELDS = {f.name for f in fields(api.PatchOptions)}


def default_out(model: str) -> Path:
    p = Path(model)
    return p.with_name(f"{p.stem}.hardened.safetensors")


@dataclass
class Plan:
    """What a `harden patch` run works with, once everything is loaded and checked."""

    kw: dict
    out_file: Path
    device: torch.device
    loaded: Loaded
    opts: api.PatchOptions
    recipe: object
    split: Split
    train_ds: hdata.Dataset
    val_ds: hdata.Dataset | None
    eval_ds: hdata.Dataset
    spec: A.AttackSpec
    cfg: F.FitConfig
    ecfg: E.EvalConfig
    warnings: list[str]
    route: str
    world: D.World = D.World()  # the processes of a torchrun launch (one by default)
    saver: Saver | None = None  # the resumable state beside --out, once training starts
    parent: torch.nn.Module | None = None  # the base as it was, when the method fine-tunes it
    cost: dict | None = None  # what the patches add: parameters and multiply-adds (layers.patch_cost)
    inference: C.Cost | None = None  # the patched model against the base: counted here, latency after training
    invocation: dict | None = None  # the command line and a command that reproduces the run (the report's)

    @property
    def quick(self) -> bool:
        return self.kw["report_budget"] == "quick"


def run(call: Call) -> None:
    """The whole command: checks, plan, training, the checkpoint, the report."""
    plan = _plan(call)
    plan.invocation = invocation.record("patch", call)
    logs, info, estimate, train_seconds = _train(plan)
    if not plan.world.main:  # another process of `torchrun ... -m hardener patch`: rank 0 writes and reports
        D.finish(plan.world)
        return
    manifest = _write(plan, logs, train_seconds)
    D.finish(plan.world)
    if plan.inference is not None:  # the trained model on its inference route, the run's device and threads
        plan.inference.latency = C.measure_latency(plan.loaded.patched)
        if not plan.kw["quiet"]:
            _say(f"cost: {C.describe_latency(plan.inference)}")
    _report(plan, manifest, logs, info, estimate, train_seconds)


def _check(call: Call) -> tuple[str, Path]:
    """Option errors come before any loading."""
    kw = call.params
    model = model_arg(kw["model"])
    if not kw["data"]:
        raise UsageError("missing --data (training data, or `data` in harden.toml)")
    out_file = Path(kw["out_path"]) if kw["out_path"] else default_out(model)
    if kw["mlflow"]:
        from ..tracking import require

        require()
    if kw["report_path"]:
        R.check_path(kw["report_path"])
    call.check_run([("--out", out_file), ("--report", kw["report_path"])], kw["force"])
    return model, out_file


def _plan(call: Call) -> Plan:
    kw = call.params
    model, out_file = _check(call)
    recipe = load_preset(kw["preset"]) if kw["preset"] else None
    parse_methods(kw["method"], kw["bn"], kw["at"] or kw["at_regex"])
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], what="--eps")
    A.expand([kw["attack_name"]])  # unknown names fail before any loading
    A.parse_smooth_grad(kw["smooth_grad"])
    subset = hdata.parse_subset(kw["subset"])
    api.parse_betas(kw["betas"])
    C.parse_budget(kw["budget"])
    if kw["select_on"] and kw["validate"]:
        raise InputError("--select-on and --validate both hold out a validation split: give one")
    world, device = start(kw)
    loaded = load_model(model, model_options(kw), allow_patched=False)
    ds_all = load_data(loaded, kw["data"], data_options(kw))
    infos = finish_spec(loaded, ds_all, device)
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], math.prod(loaded.spec.shape), what="--eps")
    announce(ds_all, kw["quiet"])
    opts = api.PatchOptions(**{f: v for f, v in kw.items() if f in PATCH_FIELDS})
    api.attach_patches(loaded.patched, infos, opts, say=(lambda t: None) if kw["quiet"] else _say)
    loaded.patched.to(device)
    inference = C.count(loaded.patched) if loaded.patched.sites else None
    cost = inference.added() if inference else None
    if cost and not kw["quiet"]:
        _say(describe_cost(cost))
    split = split_for_training(ds_all.labels, subset, bool(kw["eval_data"]), kw["select_on"] or kw["validate"],
                               kw["holdout"], kw["seed"])
    for note in split.notes:
        if not kw["quiet"]:  # a note; a warning too (below) when the number was the user's
            err_console.print(f"{ds_all.source}: {note}")
    train_ds = ds_all.take(split.train)
    val_ds = ds_all.take(split.val) if split.val is not None else None
    spec, cfg = api.training_setup(opts, loaded.spec.num_classes)
    quick = kw["report_budget"] == "quick"
    eval_samples = kw["eval_samples"] if kw["eval_samples"] is not None else (500 if quick else 1000)
    eval_ds, unused, warnings = _report_data(loaded, ds_all, split.rest, kw["eval_data"], eval_samples, kw)
    low = check_accuracy(Disabled(loaded.patched), ds_all, loaded.spec.num_classes, device, opts.allow_low_accuracy)
    warnings = loaded.warnings + ([low] if low else []) + warnings
    if opts.unlabeled:
        train_ds, cfg = _pseudo_labelled(loaded, ds_all, unused, train_ds, opts, cfg, split, device, kw)
    cfg = api.settle_batch_size(cfg, opts, len(train_ds))
    if call.given("select_on"):
        warnings += [n for n in split.notes if n.startswith("--select-on")]  # the user's number could not be met
    warnings += _recipe_warnings(recipe, cfg, cfg.epoch_images(len(train_ds)), epochs_given=call.given("epochs"))
    if cfg.adaptive and A.info(spec.name).kind == "single-step" and val_ds is None:
        warnings.append(f"training with the single-step attack {spec.name} without a validation split: catastrophic "
                        "overfitting (PGD robustness collapsing while the training attack is defeated) would go "
                        "unseen; pass --select-on N (or --validate N) to watch for it and fall back to PGD")
    if cost and cost["parameters"] > COSTLY * cost["base_parameters"]:
        share = cost["parameters"] / max(1, cost["base_parameters"])
        warnings.append(f"the patches add {cost['parameters']:,} parameters, {share:.0%} of the base's: choose sites "
                        "with fewer channels (`harden layers`) or a larger --rho")
    if cost and cost["base_macs"] and cost["macs"] > COSTLY_MACS * cost["base_macs"]:
        times = 1 + cost["macs"] / cost["base_macs"]
        patched = loaded.patched
        prefilter = any(getattr(patched.patches[k], "kind", "") == "prefilter" for k in patched.sites.values())
        hint = ("a pre-filter at full input resolution is usually most of it: --prefilter-stride 2 or --width 32 cut it "
                "at a cost in robustness (bench/RESULTS.md, 'A cheaper robust recipe')" if prefilter else
                "choose fewer sites, or sites at lower resolution (`harden layers`)")
        warnings.append(f"the patches add {cost['macs'] / 1e6:,.1f}M multiply-adds per image, {times - 1:.1f}x the "
                        f"base's {cost['base_macs'] / 1e6:,.1f}M: the patched model costs {times:.1f}x the base at "
                        f"inference and in every attack step; {hint}")
    ecfg = _report_config(quick, spec, kw["norm"], kw["eval_steps"], cfg.batch_size, kw["seed"])
    plan = Plan(kw, out_file, device, loaded, opts, recipe, split, train_ds, val_ds, eval_ds, spec, cfg, ecfg,
                warnings, kw["route"] or M.build(cfg).default_route, world, cost=cost, inference=inference)
    _print_plan(train_ds, val_ds, eval_ds, cfg, spec, ecfg, recipe, kw["quiet"], opts.batch_size == "auto",
                inference)
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    return plan


def _train(plan: Plan) -> tuple[list, dict, dict, float]:
    """Train with a resumable state beside --out; the time estimate said once, after the first steps."""
    kw, loaded, cfg, spec, val_ds = plan.kw, plan.loaded, plan.cfg, plan.spec, plan.val_ds
    saver = Saver(plan.out_file.with_name(plan.out_file.name + ".partial"), resume=kw["resume"],
                  every_steps=kw["save_every"],
                  fingerprint=fingerprint({"base": loaded.base.sha256, "data": plan.train_ds.fingerprint(),
                                           "patches": loaded.patched.patch_specs(), "fit": asdict(cfg),
                                           "attack": spec.record(), "device": plan.device.type,
                                           "val": val_ds.fingerprint() if val_ds is not None else None,
                                           "processes": plan.world.size}),
                  readonly=not plan.world.main)
    saver.check_start()
    plan.saver = saver
    plan.parent = loaded.patched.base_copy() if cfg.full else None
    t0 = time.time()
    info: dict = {}
    estimate: dict = {}

    def on_estimate(est: dict) -> None:
        report_s = est["unit_seconds"] * report_units(plan.ecfg, len(plan.eval_ds))
        estimate.update(est, report_seconds=report_s)
        if not kw["quiet"]:
            err_console.print(f"estimated time left: training {F.fmt_seconds(est['train_seconds'])}"
                              + (f" + validation {F.fmt_seconds(est['validation_seconds'])}" if val_ds else "")
                              + f" + report {F.fmt_seconds(report_s)} = "
                              f"{F.fmt_seconds(est['seconds'] + report_s)} (measured from the first "
                              f"{est['timed_steps']} steps: {est['seconds_per_step']:.2f} s per step)")

    with ProgressView(kw["quiet"]) as progress, StopFlag().installed() as stop:
        logs = F.fit(loaded.patched, plan.train_ds, spec, cfg, plan.device, progress, saver=saver,
                     stop=lambda: bool(stop), val=val_ds, info=info, cache_dir=plan.out_file.parent,
                     on_estimate=on_estimate, world=plan.world)
    train_seconds = time.time() - t0
    for e in logs:
        if e.fallback:
            plan.warnings.append(f"catastrophic overfitting of the {spec.name} training attack after epoch {e.epoch} "
                                 f"(validation PGD-10 fell to {100 * e.val_robust:.1f}%): training went back to the "
                                 f"best epoch and on with {e.fallback}")
            err_console.print(f"[yellow]warning:[/] {plan.warnings[-1]}", highlight=False)
    if "cache" in info and not kw["quiet"]:
        err_console.print(f"cache: {info['cache']}")
    return logs, info, estimate, train_seconds


def _write(plan: Plan, logs: list, train_seconds: float) -> Manifest:
    """The checkpoint, atomically; the resumable state goes once it is written."""
    loaded, cfg, saver = plan.loaded, plan.cfg, plan.saver
    loaded.patched.set_route(plan.route)
    training = api.training_record(cfg, plan.spec, logs, plan.train_ds, plan.opts, plan.recipe, plan.split,
                                   plan.val_ds)
    manifest = Manifest(
        arch=loaded.base.arch, arch_kwargs=loaded.base.arch_kwargs, input=loaded.spec.to_json(),
        patches=loaded.patched.patch_specs(), base_sha256=loaded.base.sha256, training=training,
        route=plan.route, base_modified=cfg.full, parent_sha256=loaded.base.sha256 if cfg.full else "",
        cost=plan.inference.to_json(latency=False) if plan.inference else {},
    )
    try:
        save_patched(plan.out_file, loaded.patched.to("cpu"), manifest)
    except RunError as e:
        if saver.path.exists():
            raise RunError(f"{e.message}; the trained state is kept in '{saver.path}': fix that and rerun the same "
                           "command with --resume to write it without training again") from None
        raise
    saver.clear()
    loaded.patched.to(plan.device)
    return manifest


def _report(plan: Plan, manifest: Manifest, logs: list, info: dict, estimate: dict, train_seconds: float) -> None:
    kw, loaded, spec, device, out_file = plan.kw, plan.loaded, plan.spec, plan.device, plan.out_file
    n_params = _announce_written(loaded, plan.cfg, out_file, train_seconds)
    t1 = time.time()
    with ProgressView(kw["quiet"]) as progress:
        result = E.evaluate(loaded.patched, plan.eval_ds, plan.ecfg, device, has_patches=True, progress=progress,
                            reference=plan.parent.to(device) if plan.parent is not None else None)
    report_seconds = time.time() - t1
    full_cmd = _full_eval_command(out_file, loaded, kw["eval_data"], spec)
    rep = R.build("patch", result, R.data_record(plan.eval_ds, plan.warnings), R.attack_settings(result),
                  R.environment(str(device), kw["seed"], kw["deterministic"]),
                  {"checkpoint": str(out_file), "checkpoint_sha256": sha256_file(out_file), "eps": spec.eps,
                   "norm": spec.norm, "training": manifest.training, "patches": manifest.patches,
                   "train_seconds": train_seconds, "report_seconds": report_seconds,
                   "estimate": {k: v for k, v in estimate.items() if k.endswith("seconds")},
                   "trainable_parameters": n_params, "route": plan.route, "processes": plan.world.size,
                   "training_out_of_memory": info.get("out_of_memory", []),
                   "patch_cost": plan.cost, "cost": plan.inference.to_json() if plan.inference else None,
                   "invocation": plan.invocation,
                   "epoch_log": [asdict(e) for e in logs], "cache": info, "base_modified": plan.cfg.full,
                   "method": kw["method"], "preset": plan.recipe.record() if plan.recipe else None,
                   "report_budget": {"budget": kw["report_budget"], "verdict": not plan.quick,
                                     "note": QUICK_NOTE if plan.quick else "reference budgets of the training attack",
                                     "full_evaluation": full_cmd}})
    R.render_table(rep, err_console)
    if not kw["quiet"]:
        what = "quick check, not a verdict" if plan.quick else "full"
        err_console.print(f"report: {what} ({report_seconds:.0f}s); training took {train_seconds:.0f}s. Full "
                          f"verdict:\n  {full_cmd}")
    if kw["report_path"]:
        R.write(rep, kw["report_path"])
    out(str(out_file))
    if kw["mlflow"]:
        track(kw, rep, [out_file, kw["report_path"]], f"harden patch {Path(kw['model']).name}")



QUICK_NOTE = ("quick check: white-box APGD-CE with a small step budget (and its transfer from the base) on a few "
              "hundred held-out images; a weak attack gives an upper bound of robust accuracy, not a verdict: run "
              "the full_evaluation command")


def _say(text: str) -> None:
    err_console.print(text, highlight=False, markup=False)


def _recipe_warnings(recipe, cfg: F.FitConfig, n_train: int, epochs_given: bool = False) -> list[str]:
    warnings = []
    n_steps = -(-n_train // cfg.batch_size) * cfg.epochs
    if n_steps < FEW_STEPS:
        from_preset = recipe and recipe.options.get("epochs") == cfg.epochs and not epochs_given  # else the user's
        src = f" (--epochs {cfg.epochs} is preset {recipe.name}'s)" if from_preset else ""
        warnings.append(f"only {n_steps} optimiser steps ({n_train} images, batch {cfg.batch_size}, {cfg.epochs} "
                        f"epochs{src}): patches trained this briefly underfit; raise --epochs (or lower --batch-size)")
    threat = api.effective_threat_model(cfg)
    if recipe is not None and recipe.warning and recipe.threat_model == threat:
        warnings.append(recipe.warning)
    elif threat == "transfer":
        warnings.append("this patch was trained only against adversarial examples of the frozen base (transfer "
                        "threat model, --adversary base); it does not hold against an attacker who knows the patch; "
                        "for white-box robustness use the default recipe (--preset robust) or --adversary patched")
    return warnings


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


def _print_plan(train_ds, val_ds, eval_ds, cfg: F.FitConfig, spec: A.AttackSpec, ecfg: E.EvalConfig, recipe,
                quiet: bool, auto_batch: bool = False, inference: C.Cost | None = None) -> None:
    if quiet:
        return
    n_epoch = cfg.epoch_images(len(train_ds))
    per_epoch = -(-n_epoch // cfg.batch_size)
    against = ("the model being trained" if cfg.adaptive else "the frozen base, once (transfer)")
    att = f"{spec.name}" + (f"-{spec.steps}" if spec.steps and A.info(spec.name).kind != "single-step" else "")
    units = F.train_units(cfg, spec)
    lines = [f"recipe: {f'preset {recipe.name}' if recipe else 'custom options'}, training for the "
             f"{api.effective_threat_model(cfg)} threat model",
             f"training: {n_epoch:,} images per epoch, {cfg.epochs} epochs x {per_epoch} steps of {cfg.batch_size}"
             f"{' (--batch-size auto)' if auto_batch else ''} = {cfg.epochs * per_epoch:,} optimiser steps; attack {att} against {against}; about {units:.0f} "
             "forward-pass equivalents per image per step"]
    if val_ds is not None:
        lines.append(f"validation: {len(val_ds):,} held-out images after every {cfg.validate_every} epoch(s) "
                     "(PGD-10 white-box and transfer)")
    lines.append(f"report: {len(eval_ds):,} images, {', '.join(ecfg.attacks)}"
                 f"{f' {ecfg.steps} steps' if ecfg.steps else ''}, white-box then transfer")
    if inference is not None:
        lines.append(f"cost: the patched model at {C.describe_macs(inference)}; latency measured after training")
    err_console.print("plan: " + "\n      ".join(lines))


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
    from ..hf import is_hf_arch

    if loaded.base.arch and not is_hf_arch(loaded.base.arch):  # a Hugging Face base rebuilds from its manifest
        parts += ["--arch", loaded.base.arch]
        if loaded.base.arch_kwargs:
            parts += ["--arch-kwargs", json.dumps(loaded.base.arch_kwargs, sort_keys=True)]
    return " ".join(shlex.quote(p) for p in parts)


def _pseudo_labelled(loaded, ds_all, unused, train_ds, opts, cfg, split, device, kw):
    """--unlabeled: the training set with the images the frozen base labels (api.add_pseudo_labels), the
    trainer's configuration for it; the record goes into the split's."""
    if opts.unlabeled == "rest":
        if len(unused) == 0:
            raise InputError("--unlabeled rest: no images of --data are left outside the training, validation and "
                             "report images; give a smaller --subset or --eval-samples, or a folder or tensor file")
        pool = ds_all.take(unused)
        pool.source = f"{ds_all.source} (rest, labels ignored)"
    else:
        pool = load_data(loaded, opts.unlabeled, data_options(kw), labels_required=False)
    train_ds, cfg, split.record["unlabeled"] = api.add_pseudo_labels(loaded.patched, train_ds, pool, opts, cfg,
                                                                     device)
    rec = split.record["unlabeled"]
    if not kw["quiet"]:
        agree = (f"; they agree with the pool's own labels on {100 * rec['agreement_with_pool_labels']:.1f}%"
                 if "agreement_with_pool_labels" in rec else "")
        err_console.print(f"unlabeled: the base labelled {rec['kept']:,} of {rec['pool']:,} images (confidence >= "
                          f"{rec['threshold']}){agree}; {rec['per_epoch']:,} of them join each epoch", highlight=False)
    return train_ds, cfg


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
