"""The report after a patch run, for the library and the command line alike: the trained model attacked on data it
did not train on, the base beside it. `harden patch` always writes one; `hardener.patch(..., report="quick")` returns
it as the model's `.report`. Quick (the command line's default): white-box APGD-CE with a small step budget, then its
transfer from the base, on a few hundred images: a check, not a verdict. Full: the training attack at its reference
budget in both threat models.

Its data is `eval_data` when given, else images of the run's own data that the split left outside training and
validation (stratified, `eval_samples` of them); the rest of those stay for `unlabeled="rest"`. It is planned after the
split (`aside`: its data; `prepare`: its line of the plan and its share of the estimate) and run after training
(`build`)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import attacks as A
from .. import data as hdata
from ..errors import InputError
from ..evaluation import run as EV
from ..evaluation import threats as E
from ..options.choices import REPORT_BUDGETS
from ..reports import report as R

SAMPLES = {"quick": 500, "full": 1000}  # report images when `eval_samples` is not given
QUICK_STEPS = 20  # the quick check's APGD-CE steps when `eval_steps` is not given
QUICK_NOTE = ("quick check: white-box APGD-CE with a small step budget (and its transfer from the base) on a few "
              "hundred held-out images; a weak attack gives an upper bound of robust accuracy")


@dataclass
class PostReport:
    """The report a patch run asks for, and once planned (`prepare`), its data and attacks."""

    budget: str = "quick"  # "quick" or "full"
    eval_data: hdata.Dataset | None = None  # the report's data; None: held-out images of the run's data
    eval_samples: int | None = None  # at most this many report images (SAMPLES[budget] when None; 0: all)
    eval_steps: int | None = None  # attack steps (QUICK_STEPS quick, the attack's reference budget full, when None)
    eval_ds: hdata.Dataset | None = None
    unused: torch.Tensor | None = None  # indices of the run's data neither trained, validated nor reported on
    ecfg: E.EvalConfig | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.budget not in REPORT_BUDGETS:
            raise InputError(f"--report-budget '{self.budget}': choose quick or full")

    @property
    def quick(self) -> bool:
        return self.budget == "quick"


def aside(run: Any) -> list[str]:
    """After the split: the report's data, and what of the run's data it leaves unused; its warnings."""
    rep: PostReport = run.post_report
    rep.eval_ds, rep.unused, warnings = _data(run, rep)
    return warnings


def prepare(run: Any) -> str:
    """Once the batch is settled: the report's attacks; returns its line of the plan and sets `run.report_units`, its
    share of the estimate."""
    rep: PostReport = run.post_report
    rep.ecfg = config(rep, run.spec, run.opts.norm, run.cfg.batch_size, run.opts.seed)
    run.report_units = units(rep.ecfg, len(rep.eval_ds))
    return (f"report: {len(rep.eval_ds):,} images, {', '.join(rep.ecfg.attacks)}"
            f"{f' {rep.ecfg.steps} steps' if rep.ecfg.steps else ''}, white-box then transfer")


def _data(run: Any, rep: PostReport) -> tuple[hdata.Dataset, torch.Tensor, list[str]]:
    """The report's data (`eval_data`, else part of the run's data outside the subset), the indices of the run's data
    it left unused, the warnings."""
    warnings, rest = [], run.split.rest
    unused = rest
    if rep.eval_data is not None:
        eval_ds = rep.eval_data
        if tuple(eval_ds.shape) != tuple(run.ds.shape):  # found before training, not after it
            raise InputError(f"--eval-data images are {tuple(eval_ds.shape)} (C,H,W) but the training images are "
                             f"{tuple(run.ds.shape)}: give report images of the model's input size")
        hdata.check_labels(eval_ds, run.n_classes)
    else:
        if len(rest) == 0:
            raise InputError("no report data: --data has nothing left outside the training and validation images; "
                             "pass --eval-data, a smaller --subset or a larger --holdout")
        eval_ds = run.ds.take(rest)
        warnings.append("report data is held-out images of --data; the base may have been trained on them, so its "
                        "clean accuracy there may be optimistic")
    n = SAMPLES[rep.budget] if rep.eval_samples is None else rep.eval_samples
    if n and n < len(eval_ds):
        idx, left = hdata.stratified_split(eval_ds.labels, int(n), run.opts.seed)
        eval_ds = eval_ds.take(idx)
        if rep.eval_data is None:
            unused = rest[left]
    elif rep.eval_data is None:
        unused = rest[:0]
    return eval_ds, unused, warnings


def config(rep: PostReport, spec: A.AttackSpec, norm: str, batch_size: int, seed: int) -> E.EvalConfig:
    """Quick: white-box APGD-CE, QUICK_STEPS steps, first; then its transfer. Full: the training attack at its
    reference budget in both threat models."""
    quick = rep.quick
    return E.EvalConfig(attacks=["apgd-ce"] if quick else [spec.name], eps=spec.eps, norm=norm,
                        steps=(rep.eval_steps or QUICK_STEPS) if quick else rep.eval_steps,
                        threats=("whitebox", "transfer"), batch_size=max(batch_size, 256), seed=seed, checks=False)


def units(ecfg: E.EvalConfig, n: int) -> float:
    """Forward-pass equivalents of the report, per image and iterative attack. Three attacks run (on the base, on the
    patched model, on the base again for the transfer examples), but an attack step has no parameter gradients, and
    evaluation's APGD stops on a sample once it is broken: the base's own attack (a base every attack breaks) costs
    next to nothing, the patched model's less than its steps. Together about 4/3 of a training-step unit per step;
    measured with APGD's early stop, 2 threads: 7.5 s estimated for the demo's 8.7 s, 29 s for the 10% run's 25 s (it
    was 2 units before the early stop: 11 and 42 s)."""
    steps = ecfg.steps or A.info(ecfg.attacks[0]).steps
    return n * len(ecfg.attacks) * (4 * (steps + 1) + 6)


def trainable_parameters(patched: Any, full: bool) -> int:
    """The parameters a run trained: its patches', and every base weight too for a method that fine-tunes the base."""
    n = sum(p.numel() for p in patched.patch_parameters())
    return n + (sum(p.numel() for p in patched.model.parameters()) if full else 0)


def build(run: Any, progress: Any = None, extra: dict | None = None, deterministic: bool = False) -> dict:
    """The trained model of a finished patch run attacked on the report's data: the report (`reports.report.build`),
    with what the run knows of itself; `extra` adds the caller's (the checkpoint, the command line)."""
    rep: PostReport = run.post_report
    t0 = time.time()
    view = progress if hasattr(progress, "__enter__") else contextlib.nullcontext(progress)
    with view as show:
        result = E.evaluate(run.patched, rep.eval_ds, rep.ecfg, run.device, has_patches=True, progress=show,
                            reference=run.parent.to(run.device) if run.parent is not None else None)
    rep.seconds = time.time() - t0
    fields = {"eps": run.spec.eps, "norm": run.spec.norm, "training": run.record.to_dict(),
              "patches": run.patched.patch_specs(), "train_seconds": run.train_seconds, "report_seconds": rep.seconds,
              "estimate": {k: v for k, v in run.estimate.items() if k.endswith("seconds")},
              "trainable_parameters": trainable_parameters(run.patched, run.cfg.full), "route": run.route,
              "processes": run.hooks.world.size,
              "training_out_of_memory": run.info.get("out_of_memory", []), "patch_cost": run.cost,
              "cost": run.inference.to_json() if run.inference else None,
              "epoch_log": [asdict(e) for e in run.logs], "cache": run.info, "base_modified": run.cfg.full,
              "method": run.opts.method, "preset": run.preset.record() if run.preset else None,
              "report_budget": {"budget": rep.budget, "verdict": not rep.quick,
                                "note": QUICK_NOTE if rep.quick else "reference budgets of the training attack"}}
    for k, v in (extra or {}).items():
        fields[k] = {**fields[k], **v} if isinstance(v, dict) and isinstance(fields.get(k), dict) else v
    out = R.build("patch", result, R.data_record(rep.eval_ds, [run.hooks.words(w) for w in run.warnings]),
                  R.attack_settings(result), R.environment(str(run.device), run.opts.seed, deterministic), fields)
    return EV.words_of_report(out, run.hooks.words)

