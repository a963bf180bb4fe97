"""One `harden patch` run, for the library and the command line alike: attach the patches, split the data, set up
training, pseudo-label, settle the batch, time the patched model, plan (the plan, the notes, the warnings), train,
route, record. `hardener.patch` and `cli/commands/patch.py` both call `patch_run` (and `training.report` for the
report after it); what differs between them is in `Hooks`: where the plan, the notes, the warnings and the progress
go, and what the command line adds (a resumable state beside --out, torchrun's world, the stop flag, its data
options)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import attacks as A
from .. import data as hdata
from .. import methods as M
from ..errors import InputError, Interrupted
from ..io.resume import Saver, fingerprint
from ..io.session import check_accuracy
from ..options.patch_options import PatchOptions
from ..options.recipe import Split, split_for_training
from ..patches import PatchedModel
from ..patches import cost as C
from ..patches.attach import Disabled
from ..patches.layers import describe_cost
from ..runtime import distributed as D
from ..runtime.console import library_voice, silent
from . import fit as F
from . import report as TR
from . import steps as S
from .record import TrainingRecord

COSTLY = 1.0  # patches with more parameters than this fraction of the base's get a warning (the base itself)
COSTLY_MACS = 3.0  # ... and with more multiply-adds than this multiple of the base's (inference over 4x the base's)
# Fewer optimiser steps than this and patches underfit (1% of Fashion-MNIST at batch 128 and 10 epochs:
# 50 steps, and fixers fitted 19% of their training attack).
FEW_STEPS = 200


@dataclass
class Hooks:
    """Where a patch run's output goes, and what its caller adds. Each callable that takes the run is called once,
    at its point of the sequence."""

    say: Callable[[str], None] = silent  # the plan and the notes (sites chosen, split, pseudo-labels, estimate)
    warn: Callable[[str], None] = silent  # each warning, once (the run's `warnings` keeps them all)
    progress: Any = None  # fit's progress callback; one that is a context manager (ProgressView) is entered for fit
    stop: Any = None  # a resume.StopFlag, installed around training: set, training saves and stops
    world: D.World = field(default_factory=D.World)  # the processes of a torchrun launch
    saver: Callable[["PatchRun"], Saver] | None = None  # the resumable state, once the training set is known
    load_data: Callable[[Any], hdata.Dataset] | None = None  # `unlabeled` data, with the caller's data options
    cache_dir: Path | None = None  # where training caches spill
    keep_parent: bool = False  # keep the base as it was when the method fine-tunes it: the report's base (the
    # command line always; the library when a report is asked)
    words: Callable[[str], str] = str  # the caller's words for the report's notes (the library's: `options.wording`)


@dataclass
class PatchRun:
    """A patch run: its inputs (a `PatchedModel` without patches, finished on `ds`), then what the run made of them."""

    patched: PatchedModel
    ds: hdata.Dataset
    opts: PatchOptions
    preset: Any  # recipe.Preset or None: the recipe the options came from
    device: torch.device
    hooks: Hooks = field(default_factory=Hooks)
    given: frozenset = frozenset()  # options the caller set itself, not the preset (epochs, select_on)
    post_report: TR.PostReport | None = None  # the report after training (`training.report`), when one is asked
    warnings: list[str] = field(default_factory=list)  # the caller's first (the model's), then the run's
    split: Split | None = None
    train_ds: hdata.Dataset | None = None
    val_ds: hdata.Dataset | None = None
    spec: A.AttackSpec | None = None
    cfg: F.FitConfig | None = None
    inference: C.Cost | None = None  # the patched model against the base: counted at attach, timed in the plan
    cost: dict | None = None  # what the patches add: parameters and multiply-adds
    report_units: float = 0.0  # the post-training report, in forward-pass units (the estimate's last term)
    saver: Saver | None = None
    parent: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None  # --teacher: the robust teacher of --loss rslad (frozen; never saved)
    logs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what fit says of its caches and out-of-memory retries
    estimate: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    route: str = ""  # the route the trained model serves on (set in the plan, once the method is known)
    record: TrainingRecord | None = None  # the training record the checkpoint stores

    @property
    def n_classes(self) -> int:
        return self.patched.model.spec.num_classes

    @property
    def eval_elsewhere(self) -> bool:
        """The report's data is not part of `ds` (or there is no report): the split keeps none of `ds` aside for it."""
        return self.post_report is None or self.post_report.eval_data is not None


def patch_run(run: PatchRun, infos: list) -> PatchRun:
    """The whole run on `run`'s model and data (`infos`: its layer table, `api.finish`): returns it, trained, routed
    and recorded (its latency timed in the plan: `time_inference`)."""
    plan(run, infos)
    train(run)
    run.patched.set_route(run.route)
    A.build(run.patched, run.spec)  # the attack's settings, filled in by a build, also when a resumed run never built it
    run.record = S.training_record(run.cfg, run.spec, run.logs, run.train_ds, run.opts, run.preset, run.split,
                                   run.val_ds)
    return run


def plan(run: PatchRun, infos: list) -> None:
    """Everything before training: patches attached, the split, the trainer's configuration, the plan said and the
    warnings warned."""
    o, h = run.opts, run.hooks
    teacher = None  # loaded onto a copy of the base before any patch is attached to it
    if o.teacher is not None:
        run.teacher, teacher = S.load_teacher(run.patched, run.ds, o.teacher, run.device)
    sizing = S.attach_patches(run.patched, infos, o, say=h.say)
    run.patched.to(run.device)
    run.inference = C.count(run.patched) if run.patched.sites else None
    if run.inference is not None:  # the budget asked for and what it chose, recorded beside the cost
        run.inference.budget, run.inference.sizing = C.parse_budget(o.budget), sizing
    run.cost = run.inference.added() if run.inference else None
    if run.cost:
        h.say(describe_cost(run.cost))
    run.split = split_for_training(run.ds.labels, hdata.parse_subset(o.subset), run.eval_elsewhere,
                                   o.select_on or o.validate, o.holdout, o.seed)
    for note in run.split.notes:  # a note; a warning too (below) when the number was the user's
        h.say(f"{run.ds.source}: {note}")
    run.train_ds = run.ds.take(run.split.train)
    run.val_ds = run.ds.take(run.split.val) if run.split.val is not None else None
    run.spec, cfg = S.training_setup(o, run.n_classes, teacher)
    aside = TR.aside(run) if run.post_report else []
    low = check_accuracy(Disabled(run.patched), run.ds, run.n_classes, run.device, o.allow_low_accuracy)
    run.warnings += ([low] if low else []) + aside
    if o.unlabeled is not None and not (isinstance(o.unlabeled, str) and not o.unlabeled):
        cfg = _pseudo_labelled(run, cfg)
    run.cfg = S.settle_batch_size(cfg, o, len(run.train_ds))
    run.route = o.route or M.build(run.cfg).default_route
    if "select_on" in run.given:
        run.warnings += [n for n in run.split.notes if n.startswith("--select-on")]  # the user's number was not met
    run.warnings += recipe_warnings(run.preset, run.cfg, run.cfg.epoch_images(len(run.train_ds)),
                                    epochs_given="epochs" in run.given)
    run.warnings += _run_warnings(run)
    over = time_inference(run)
    run.warnings += [over] if over else []
    report_line = TR.prepare(run) if run.post_report else None
    h.say(plan_text(run, report_line))
    for w in run.warnings:
        h.warn(w)


def _pseudo_labelled(run: PatchRun, cfg: F.FitConfig) -> F.FitConfig:
    """`unlabeled`: the training set with the images the frozen base labels (S.add_pseudo_labels)."""
    o = run.opts
    if isinstance(o.unlabeled, str) and o.unlabeled == "rest":
        rest = run.post_report.unused if run.post_report else run.split.rest
        if len(rest) == 0:
            raise InputError("--unlabeled rest: no images of --data are left outside the training, validation and "
                             "report images; give a smaller --subset or --eval-samples, or a folder or tensor file"
                             if run.post_report else "--unlabeled rest: no images of --data are left outside the "
                             "training and validation images; give a smaller --subset, or a folder or tensor file")
        pool = run.ds.take(rest)
        pool.source = f"{run.ds.source} (rest, labels ignored)"
    elif run.hooks.load_data:
        pool = run.hooks.load_data(o.unlabeled)
    else:
        pool = hdata.as_dataset(o.unlabeled, labels_required=False)
    run.train_ds, cfg, rec = S.add_pseudo_labels(run.patched, run.train_ds, pool, o, cfg, run.device)
    run.split.record["unlabeled"] = rec
    agree = (f"; they agree with the pool's own labels on {100 * rec['agreement_with_pool_labels']:.1f}%"
             if "agreement_with_pool_labels" in rec else "")
    run.hooks.say(f"unlabeled: the base labelled {rec['kept']:,} of {rec['pool']:,} images (confidence >= "
                  f"{rec['threshold']}){agree}; {rec['per_epoch']:,} of them join each epoch")
    return cfg


def recipe_warnings(recipe, cfg: F.FitConfig, n_train: int, epochs_given: bool = False) -> list[str]:
    """Too few optimiser steps (FEW_STEPS); the recipe's own warning, or the transfer threat model's."""
    warnings = []
    n_steps = -(-n_train // cfg.batch_size) * cfg.epochs
    if n_steps < FEW_STEPS:
        from_preset = recipe and recipe.options.get("epochs") == cfg.epochs and not epochs_given  # else the user's
        src = f" (--epochs {cfg.epochs} is preset {recipe.name}'s)" if from_preset else ""
        warnings.append(f"only {n_steps} optimiser steps ({n_train} images, batch {cfg.batch_size}, "
                        f"{plural(cfg.epochs, 'epoch')}{src}): patches trained this briefly underfit; raise --epochs "
                        "(or lower --batch-size)")
    threat = S.effective_threat_model(cfg)
    if recipe is not None and recipe.warning and recipe.threat_model == threat:
        warnings.append(recipe.warning)
    elif threat == "transfer":
        warnings.append("this patch was trained only against adversarial examples of the frozen base (transfer "
                        "threat model, --adversary base); it does not hold against an attacker who knows the patch; "
                        "for white-box robustness use the default recipe (--preset robust) or --adversary patched")
    return warnings


def _run_warnings(run: PatchRun) -> list[str]:
    """A single-step attack with nothing to watch it; patches that cost more than the base."""
    warnings, cfg, spec, cost = [], run.cfg, run.spec, run.cost
    if cfg.adaptive and A.info(spec.name).kind == "single-step" and run.val_ds is None:
        warnings.append(f"training with the single-step attack {spec.name} without a validation split: catastrophic "
                        "overfitting (PGD robustness collapsing while the training attack is defeated) would go "
                        "unseen; pass --select-on N (or --validate N) to watch for it and fall back to PGD")
    if cost and cost["parameters"] > COSTLY * cost["base_parameters"]:
        share = cost["parameters"] / max(1, cost["base_parameters"])
        warnings.append(f"the patches add {cost['parameters']:,} parameters, {share:.0%} of the base's: choose sites "
                        "with fewer channels (`harden layers`) or a larger --rho")
    if cost and cost["base_macs"] and cost["macs"] > COSTLY_MACS * cost["base_macs"]:
        times = 1 + cost["macs"] / cost["base_macs"]
        patched = run.patched
        prefilter = any(getattr(patched.patches[k], "kind", "") == "prefilter" for k in patched.sites.values())
        hint = ("a pre-filter at full input resolution is usually most of it: --prefilter-stride 2 or --width 32 cut it "
                "at a cost in robustness (bench/RESULTS.md, 'A cheaper robust recipe')" if prefilter else
                "choose fewer sites, or sites at lower resolution (`harden layers`)")
        warnings.append(f"the patches add {C.fmt(cost['macs'])} multiply-adds per image, {times - 1:.1f}x the "
                        f"base's {C.fmt(cost['base_macs'])}: the patched model costs {times:.1f}x the base at "
                        f"inference and in every attack step; {hint}")
    return warnings


def plural(n: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def plan_text(run: PatchRun, report_line: str | None = None) -> str:
    """The plan: recipe, training, validation, the caller's report, the cost."""
    cfg, spec, recipe = run.cfg, run.spec, run.preset
    n_epoch = cfg.epoch_images(len(run.train_ds))
    per_epoch = -(-n_epoch // cfg.batch_size)
    against = ("the model being trained" if cfg.adaptive else "the frozen base, once (transfer)")
    att = f"{spec.name}" + (f"-{spec.steps}" if spec.steps and A.info(spec.name).kind != "single-step" else "")
    units = F.train_units(cfg, spec)
    auto = run.opts.batch_size == "auto"
    lines = [f"recipe: {f'preset {recipe.name}' if recipe else 'custom options'}, training for the "
             f"{S.effective_threat_model(cfg)} threat model",
             f"training: {n_epoch:,} images per epoch, {plural(cfg.epochs, 'epoch')} x {plural(per_epoch, 'step')} "
             f"of {cfg.batch_size}"
             f"{' (--batch-size auto)' if auto else ''} = {cfg.epochs * per_epoch:,} optimiser steps; attack {att} "
             f"against {against}; about {units:.0f} forward-pass equivalents per image per step"]
    if run.val_ds is not None:
        lines.append(f"validation: {len(run.val_ds):,} held-out images after every {cfg.validate_every} epoch(s) "
                     "(PGD-10 white-box and transfer)")
    if cfg.teacher is not None:
        w = cfg.teacher_weight
        lines.append(f"teacher: {cfg.teacher.get('file') or cfg.teacher.get('module')} (--loss rslad: its soft labels "
                     f"on the clean input are the targets, weight {w:.3g} on the adversarial input, {1 - w:.3g} on the "
                     "clean one)")
    if report_line:
        lines.append(report_line)
    if run.inference is not None:
        lines.append(f"cost: the patched model at {C.describe(run.inference)}")
    return "plan: " + "\n      ".join(lines)


def train(run: PatchRun) -> None:
    """fit, with the caller's saver, stop flag, world and progress; the estimate said once, after the first steps."""
    h = run.hooks
    run.saver = h.saver(run) if h.saver else None
    run.parent = run.patched.base_copy() if run.cfg.full and h.keep_parent else None
    t0 = time.time()
    progress = h.progress if hasattr(h.progress, "__enter__") else contextlib.nullcontext(h.progress)
    stop = h.stop.installed() if h.stop is not None else contextlib.nullcontext(None)
    with progress as show, stop as flag:
        run.logs = F.fit(run.patched, run.train_ds, run.spec, run.cfg, run.device, show, saver=run.saver,
                         stop=lambda: bool(flag), val=run.val_ds, info=run.info, cache_dir=h.cache_dir,
                         on_estimate=lambda est: _estimate(run, est), world=h.world, teacher=run.teacher)
    if flag:  # a signal after the last step (in the last validation, or as training ended): honoured, not lost
        saved = run.saver is not None and run.saver.path.exists()
        raise Interrupted("interrupted after training: " + (f"the trained state is kept in '{run.saver.path}'; rerun "
                                                            "with --resume to finish without training "
                                                            "again" if saved else "nothing was saved"))
    run.train_seconds = time.time() - t0
    for e in run.logs:
        if e.fallback:
            run.warnings.append(f"catastrophic overfitting of the {run.spec.name} training attack after epoch "
                                f"{e.epoch} (validation PGD-10 fell to {100 * e.val_robust:.1f}%): training went back "
                                f"to the best epoch and on with {e.fallback}")
            h.warn(run.warnings[-1])
    if "cache" in run.info:
        h.say(f"cache: {run.info['cache']}")


def _estimate(run: PatchRun, est: dict) -> None:
    report_s = est["unit_seconds"] * run.report_units
    run.estimate.update(est, **({"report_seconds": report_s} if run.post_report else {}))
    run.hooks.say(f"estimated time left: training {F.fmt_seconds(est['train_seconds'])}"
                  + (f" + validation {F.fmt_seconds(est['validation_seconds'])}" if run.val_ds else "")
                  + (f" + report {F.fmt_seconds(report_s)}" if run.post_report else "")
                  + f" = {F.fmt_seconds(est['seconds'] + report_s)} (measured from the first "
                  f"{est['timed_steps']} steps: {est['seconds_per_step']:.2f} s per step)")


def time_inference(run: PatchRun) -> str | None:
    """The patched model's latency against the base, timed before training, so that the plan says it (the weights do
    not change it: the same patches, untrained, run the same operations) on the route it will serve on, the run's
    device and threads; by the main process only (the others would share its cores). With a `--budget`, a measured
    latency past it is returned as a warning: the budget counts multiply-adds, which do not see that a thin
    convolution costs more time per multiply-add than the base's."""
    if run.inference is None or not run.hooks.world.main:
        return None
    with run.patched.route(run.route):
        run.inference.latency = C.measure_latency(run.patched)
    budget, ratio = C.parse_budget(run.opts.budget), run.inference.latency_ratio
    if budget is None or ratio is None or ratio <= budget:
        return None
    noisy = run.inference.worst_batch.get("noisy")  # the batch past the budget
    return (f"the patched model fits --budget {budget:g} in multiply-adds ({run.inference.macs_ratio:.2f}x the "
            f"base's) but measured {ratio:.2f}x the base's latency here ({C.describe_latency(run.inference)}): "
            + ("the timings were noisy (a busy machine?), so time it on a quiet one before you act on this"
               if noisy else "thin patch convolutions cost more time per multiply-add than the base's; time it "
               "where it will serve, or lower --budget"))


def saver_at(path: Path, run: PatchRun, base_sha256: str, resume: bool, every_steps: int = 0) -> Saver:
    """The training's resumable state at `path`, for this base, data, patches, configuration, device and world (the
    command line's beside --out, the library's `state=`); an interrupted run there is neither lost (without
    `resume`) nor resumed under other settings."""
    world = run.hooks.world
    saver = Saver(path, resume=resume, every_steps=every_steps,
                  fingerprint=fingerprint({"base": base_sha256, "data": run.train_ds.fingerprint(),
                                           "patches": run.patched.patch_specs(), "fit": F.config_record(run.cfg),
                                           "attack": run.spec.record(), "device": run.device.type,
                                           "val": run.val_ds.fingerprint() if run.val_ds is not None else None,
                                           "processes": world.size}),
                  readonly=not world.main)
    saver.check_start()
    return saver


def library_hooks(progress: Any = True, words: Callable[[str], str] | None = None) -> Hooks:
    """`hardener.patch`'s: the library's voice (`console.library_voice`: progress on stderr with `True`, the plan and
    notes to the "hardener" logger, warnings as `UserWarning`s)."""
    say, warn, view = library_voice(progress, words)
    return Hooks(say=say, warn=warn, progress=view, words=words or str)
