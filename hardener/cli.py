"""The `harden` command line: parse options, call the library, render. No logic of its own.

Exit codes: 0 ok; 1 a --fail-under threshold missed; 2 usage or input error; 3 run failed
(NaN loss, out of memory, disk full); 130 interrupted.
"""
from __future__ import annotations

import errno
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import click
import torch
from rich.console import Console

from . import __version__, api, attacks as A, data as hdata, distributed as D, evaluation as E, fit as F, methods as M
from . import report as R, validate as V
from .checkpoint import Manifest, atomic_write, save_patched, sha256_file, write_torch
from .config import ConfigCommand
from .errors import HardenError, InputError, Interrupted, RunError, ThresholdError
from .patches import suggest_sites
from .resume import EvalStore, Saver, StopFlag, fingerprint, sigterm_as_interrupt
from .patches import ACTIVATIONS, DENOISE_OPS
from .recipe import DEFAULT_PRESET, load_preset, parse_methods, preset_names, split_for_training
from .session import (DataOptions, ModelOptions, finish_spec, load_data, load_model, load_parent, pick_device,
                      set_deterministic)

err_console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
# Fewer optimiser steps than this and patches underfit (1% of Fashion-MNIST at batch 128 and 10 epochs:
# 50 steps, and fixers fitted 19% of their training attack).
FEW_STEPS = 200
PATCH_FIELDS = {f.name for f in fields(api.PatchOptions)}


def out(text: str) -> None:
    click.echo(text)


class ProgressView:
    """Progress on stderr: a rich bar on a terminal; plain lines every HARDEN_PROGRESS_SECONDS (default 10) and at
    the end of each phase otherwise (CI logs, pipes); nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        import os

        self.quiet = quiet
        self.lines = not err_console.is_terminal
        try:
            self.every = float(os.environ.get("HARDEN_PROGRESS_SECONDS", "10") or 10)
        except ValueError:
            self.every = -1.0
        if not self.every > 0:
            raise InputError(f"HARDEN_PROGRESS_SECONDS must be a positive number of seconds, got "
                             f"'{os.environ.get('HARDEN_PROGRESS_SECONDS')}'")
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._last = 0.0
        self._mark = time.time()  # the last callback of any phase: where a new phase starts

    def __enter__(self) -> "ProgressView":
        if not self.quiet and not self.lines:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=err_console, transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if self.quiet:
            return
        text = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        if self.lines:
            self._line(phase, done, total, text, info)
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="")
        self._progress.update(self._tasks[phase], completed=done, total=total, info=text)

    def _line(self, phase: str, done: int, total: int, text: str, info: dict) -> None:
        from .fit import fmt_seconds

        now = time.time()
        start = self._started.setdefault(phase, self._mark)
        self._mark = now
        if now - self._last < self.every and done < total:
            return
        self._last = now
        elapsed = now - start
        eta = info.get("eta") or (fmt_seconds(elapsed / done * (total - done)) if done else "?")
        rest = " ".join(t for t in text.split() if not t.startswith("eta="))
        click.echo(f"{phase} {done}/{total} ({done / max(1, total):.0%}) elapsed {fmt_seconds(elapsed)} eta {eta}"
                   + (f" {rest}" if rest else ""), err=True)


# ---------------------------------------------------------------- shared options


def model_options(f):
    opts = [
        click.option("--arch", help="Model constructor: package.module:callable or path/to/file.py:callable."),
        click.option("--arch-kwargs", help="JSON object of keyword arguments for --arch."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a whole pickled nn.Module (runs its code)."),
        click.option("--trust-arch", is_flag=True,
                     help="Use the architecture and kwargs a patched checkpoint records (else only --arch or a "
                          "HARDEN_TRUSTED_ARCH module prefix; see README, Security model)."),
        click.option("--mean", help="Per-channel mean the model expects (comma list); normalisation is wrapped "
                                    "inside the model, attacks work on [0,1] pixels."),
        click.option("--std", help="Per-channel std the model expects (comma list)."),
        click.option("--logits", help="Key or index of the logits in a tuple/dict/object output."),
        click.option("--input-shape", help="C,H,W where it cannot be inferred from the data."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
        click.option("--deterministic", is_flag=True,
                     help="Deterministic kernels (for GPU runs; CPU runs are deterministic for a thread count)."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--config", type=click.Path(dir_okay=False), help="TOML config file (default: ./harden.toml)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def data_options(f):
    opts = [
        click.option("--subset", help="Fraction (0.1 or 10%) or count (600) of --data, stratified and seeded."),
        click.option("--classes", type=click.Path(exists=True, dir_okay=False),
                     help="Class names in model order (JSON list/object or one per line)."),
        click.option("--resize", help="Resize images to H,W."),
        click.option("--crop", help="Centre-crop images to H,W (after --resize)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def adaptive_options(f, with_eps: bool = True):
    opts = [
        click.option("--reference-data", help="Labelled training data the adaptive post-training samples from."),
        *([click.option("--eps", "adaptive_eps", default="8/255", show_default=True,
                        help="Perturbation budget of the neighbour search and the post-training attacks.")]
          if with_eps else []),
        click.option("--neighbour", default="pgd", show_default=True, type=click.Choice(["pgd", "targeted"]),
                     help="pgd: untargeted PGD from the input; targeted: every other class, keep the most confident."),
        click.option("--neighbour-steps", default=20, show_default=True, type=int, help="Steps L of that search."),
        click.option("--post-train", default="fixed", show_default=True, type=click.Choice(["fixed", "fast", "pgd"]),
                     help="fixed: δ = x'' − x' (paper eq. 5); fast: FGSM with random start; pgd: PGD with random "
                          "start."),
        click.option("--iterations", default=10, show_default=True, type=int, help="Post-training iterations K."),
        click.option("--post-batch", default=128, show_default=True, type=int,
                     help="Reference samples per iteration M (M/2 of each class)."),
        click.option("--adapt", default="patches", show_default=True, type=click.Choice(["patches", "all"]),
                     help="Post-train only the patches (frozen base) or every weight."),
        click.option("--post-lr", default=1e-3, show_default=True, type=float,
                     help="SGD learning rate (momentum 0.9)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _announce(ds: hdata.Dataset, quiet: bool) -> None:
    """Say on stderr which class index is which and what preprocessing was done."""
    if quiet:
        return
    if ds.classes:
        err_console.print(f"{ds.source}: {len(ds)} images; classes "
                          + ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes)))
    for note in ds.notes:
        err_console.print(f"{ds.source}: {note}")


def _mopts(kw: dict) -> ModelOptions:
    return ModelOptions(**{k: kw[k] for k in ModelOptions.__dataclass_fields__})


def _dopts(kw: dict) -> DataOptions:
    return DataOptions(**{k: kw[k] for k in DataOptions.__dataclass_fields__})


def _check_model_arg(model: str | None) -> str:
    if not model:
        raise click.UsageError("missing MODEL (a checkpoint path, or `model` in harden.toml)")
    return model


class _CliError(click.ClickException):
    """A library error (`HardenError`) as click shows it: `Error: <message>`, the error's exit code."""

    def __init__(self, e: HardenError) -> None:
        super().__init__(e.format_message())
        self.exit_code = e.exit_code


class HardenGroup(click.Group):
    """The command group: library errors raised by a command become one `Error:` line and their exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HardenError as e:
            raise _CliError(e) from None


@click.group(cls=HardenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harden")
def main() -> None:
    """Harden frozen PyTorch classifiers against adversarial examples with small trainable patches.

    Exit codes: 0 ok, 1 a --fail-under threshold missed, 2 bad input, 3 run failed, 130 interrupted.
    """


# ---------------------------------------------------------------- layers


@main.command(cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--data", help="Data to take one batch from (instead of --input-shape).")
@model_options
@data_options
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout.")
def layers(model, data, as_json, **kw):
    """List named layers: type, output shape, parameters, and whether each is a valid fixer site."""
    V.check_run(click.get_current_context(), [], False)
    loaded = load_model(_check_model_arg(model), _mopts(kw))
    device = pick_device(kw["device"])
    ds = load_data(loaded, data, _dopts(kw)) if data else None
    infos = finish_spec(loaded, ds, device)
    suggested = suggest_sites(loaded.patched.net, infos)
    if as_json:
        out(json.dumps({"layers": [i.to_json() for i in infos], "suggested_sites": suggested}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{model}: input {tuple(loaded.spec.shape)}")
    for col in ("name", "type", "output shape", "params", "site", "why"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.name, i.type, "×".join(map(str, i.shape)) if i.shape else "—", f"{i.params:,}",
                      "yes" if i.site else "no", i.reason)
    err_console.print(table)
    err_console.print(f"suggested sites (about 3 blocks by depth): {', '.join(suggested)}")
    out(",".join(suggested))


# ---------------------------------------------------------------- patch


def _default_out(model: str) -> Path:
    p = Path(model)
    return p.with_name(f"{p.stem}.hardened.safetensors")


@main.command(cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--data", help="Training data: image folder, tensor file, or fashion-mnist:train.")
@click.option("--at", help="Sites, comma-separated (KIND:SITE allowed). Default: chosen automatically.")
@click.option("--at-regex", help="Regex matching whole site names.")
@click.option("--method", default="fixer", show_default=True,
              help="fixer, denoise or prefilter (the kind of --at sites), auxbn (twins of the --bn layers), "
                   "combined with commas (fixer,auxbn); or one full fine-tuning method that changes every base "
                   "weight: adv-train, advprop, advamd.")
@click.option("--bn", help="BatchNorm layers that get auxiliary twins: names, a regex, all, or auto (all if the model "
                           "has any, else none); implies auxbn.")
@click.option("--route", type=click.Choice(["adv", "main"]),
              help="Default inference route of auxiliary BNs stored in the checkpoint (default: adv for auxbn "
                   "patches, main for advprop/advamd).")
@click.option("--preset", type=click.Choice(preset_names()),
              help=f"A measured recipe (a file in hardener/presets/); options given explicitly win over it. Default: "
                   f"{DEFAULT_PRESET} when none of --method/--at/--at-regex/--adversary is given (see README).")
@click.option("--denoise", "denoise_op", default="nonlocal-gaussian", show_default=True,
              type=click.Choice(DENOISE_OPS), help="Denoising operation of denoise patches.")
@click.option("--smooth-grad", help="softplus:ALPHA — attacks in training see the base's ReLUs with a "
                                    "parametric-softplus backward (forward unchanged).")
@click.option("--act", default="linear", show_default=True, type=click.Choice(sorted(ACTIVATIONS)),
              help="Fixer activation ζ.")
@click.option("--delta", default=1.0, show_default=True, type=float, help="Fixer strength δ.")
@click.option("--rho", default=4.0, show_default=True, type=float, help="Channel compression ρ.")
@click.option("--width", default=32, show_default=True, type=int, help="Channels inside a prefilter patch.")
@click.option("--final-relu", is_flag=True, help="ReLU after the fixer (sites with non-negative output only).")
@click.option("--attack", "attack_name", default="apgd", show_default=True, help="Training attack.")
@click.option("--eps", default="8/255", show_default=True, help="Perturbation budget in pixel units (8/255, 0.1).")
@click.option("--norm", default="Linf", show_default=True, type=click.Choice(["Linf", "L2"]))
@click.option("--steps", type=int, default=10, show_default=True, help="Training attack steps.")
@click.option("--alpha", type=float, help="Step size of the pgd training attack (default 2.5·eps/steps).")
@click.option("--eps-warmup", default=0.0, show_default=True, type=float,
              help="Epochs over which the training eps ramps up from 0 (adaptive adversary).")
@click.option("--loss", "loss_name", default="fixer", show_default=True, type=click.Choice(["fixer", "trades"]),
              help="fixer: CE on clean and adversarial inputs; trades: CE on clean + β·KL(clean‖adversarial).")
@click.option("--beta", default=6.0, show_default=True, type=float, help="TRADES weight β.")
@click.option("--select-on", type=int, default=0, show_default=True,
              help="Hold out N images of --data outside the subset; keep the epoch with the best white-box "
                   "accuracy on them (PGD-10).")
@click.option("--validate", type=int, default=0, show_default=True,
              help="Hold out N images of --data outside the subset and log clean, white-box and transfer accuracy "
                   "on them after every epoch (without choosing an epoch: see --select-on).")
@click.option("--validate-every", default=1, show_default=True, type=int,
              help="Validate (--select-on, --validate) after every K-th epoch and the last only.")
@click.option("--phi", default=0.5, show_default=True, type=float,
              help="AdvAmd mediate coefficient φ (paper: 0.7 FGSM, 0.6 DeepFool, 0.5 iterative attacks).")
@click.option("--betas", default="1,1,1", show_default=True, help="AdvAmd loss weights β1,β2,β3.")
@click.option("--sigma", default=0.0, show_default=True, type=float,
              help="AdvAmd: stop once an epoch's mean loss is below σ.")
@click.option("--adversary", default="base", show_default=True, type=click.Choice(["base", "patched"]),
              help="base: examples of the frozen base (transfer, the paper); patched: regenerated against "
                   "the patched model every step (adaptive; always so for adv-train and advprop).")
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", type=float, help="Adam learning rate (default 3e-3 for patches, 1e-3 for full fine-tuning).")
@click.option("--lam", default=1.0, show_default=True, type=float, help="Feature distillation weight λ.")
@click.option("--mu", default=1.0, show_default=True, type=float,
              help="Logit distillation weight: KL to the base logits on clean inputs (0 = the paper's loss).")
@click.option("--gamma", default=0.0, show_default=True, type=float, help="Focal CE γ (0 = cross-entropy).")
@click.option("--augment", is_flag=True, help="Pad + random crop + flip, applied before the attack.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Transfer training without augmentation: cache the frozen base's answers (adversarial examples, "
                   "distillation targets, the output before the first site) instead of recomputing them.")
@click.option("--cache-limit", default="2GiB", show_default=True,
              help="Memory for those caches (e.g. 512MiB, 8GiB); beyond it they spill to disk in fp16.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Default: <stem>.hardened.safetensors.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run saved in <out>.partial.")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Also save resumable state every N steps (state is always saved each epoch and on SIGINT/SIGTERM).")
@click.option("--eval-data", help="Report data (default: the part of --data outside the subset).")
@click.option("--eval-samples", type=int, default=None,
              help="Seeded stratified subset of the report data (0 = all; default 500 quick, 1000 full).")
@click.option("--eval-steps", type=int, default=None,
              help="Report attack steps (default 20 quick, each attack's reference budget full).")
@click.option("--report-budget", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: white-box APGD-CE (20 steps) and its transfer on up to 500 held-out images, a check that "
                   "costs a few percent of training, not a verdict; full: the training attack with its reference "
                   "budget on up to 1,000 images.")
@click.option("--noise-sigma", type=float, default=0.0, show_default=True,
              help="Denoised smoothing (for harden certify): train on x + N(0, σ²) with the stability objective "
                   "CE(f(D(x+δ)), f(x)'s class) instead of adversarial examples; --preset certify sets it.")
@click.option("--holdout", default="20%", show_default=True,
              help="When --data is all there is (no --subset leaves images aside, no --eval-data), hold out this "
                   "stratified, seeded part of it (fraction or count, at most 1,000 images by default) for model "
                   "selection and the report.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report (.json/.md/.html).")
@model_options
@data_options
def patch(model, data, at, at_regex, method, bn, route, preset, denoise_op, smooth_grad, act, delta, rho, width,
          final_relu, attack_name, eps, norm, steps, alpha, eps_warmup, loss_name, beta, select_on, validate,
          validate_every, phi, betas, sigma, adversary, epochs, batch_size, lr, lam, mu, gamma, augment, cache,
          cache_limit, out_path, force, resume, save_every, eval_data, eval_samples, eval_steps, report_budget,
          noise_sigma, holdout, report_path, **kw):
    """Splice patches (fixers, denoise blocks, pre-filters, auxiliary BNs) into a frozen checkpoint, train them on
    a small subset, write the patched file and a quick report. With no method options the recipe is the white-box
    robust preset. Full fine-tuning methods (adv-train, advprop, advamd) write a new checkpoint instead, marked as
    a modified base."""
    model = _check_model_arg(model)
    if not data:
        raise click.UsageError("missing --data (training data, or `data` in harden.toml)")
    out_file = Path(out_path) if out_path else _default_out(model)
    if report_path:
        R.check_path(report_path)
    V.check_run(click.get_current_context(), [("--out", out_file), ("--report", report_path)], force)
    recipe = load_preset(preset) if preset else None
    methods = parse_methods(method, bn, at or at_regex)
    A.parse_eps(eps)  # option errors come before any loading
    A.expand([attack_name])  # unknown names fail before any loading
    A.parse_smooth_grad(smooth_grad)
    subset = hdata.parse_subset(kw["subset"])
    api.parse_betas(betas)
    if select_on and validate:
        raise InputError("--select-on and --validate both hold out a validation split: give one")
    torch.manual_seed(kw["seed"])
    set_deterministic(kw["deterministic"])
    device = pick_device(kw["device"])
    loaded = load_model(model, _mopts(kw), allow_patched=False)
    ds_all = load_data(loaded, data, _dopts(kw))
    infos = finish_spec(loaded, ds_all, device)
    _announce(ds_all, kw["quiet"])
    opts = api.PatchOptions(**{f: v for f, v in click.get_current_context().params.items() if f in PATCH_FIELDS})
    api.attach_patches(loaded.patched, infos, opts, say=(lambda t: None) if kw["quiet"] else err_console.print)
    loaded.patched.to(device)

    split = split_for_training(ds_all.labels, subset, bool(eval_data), select_on or validate, holdout, kw["seed"])
    for note in split.notes:
        if not kw["quiet"]:  # a note; a warning too (below) when the number was the user's
            err_console.print(f"{ds_all.source}: {note}")
    train_ds = ds_all.take(split.train)
    val_ds = ds_all.take(split.val) if split.val is not None else None
    spec, cfg = api.training_setup(opts, loaded.spec.num_classes)
    default_route = route or M.build(cfg).default_route
    quick = report_budget == "quick"
    if eval_samples is None:
        eval_samples = 500 if quick else 1000
    eval_ds, warnings = _report_data(loaded, ds_all, split.rest, eval_data, eval_samples, kw)
    if click.get_current_context().get_parameter_source("select_on") == click.core.ParameterSource.COMMANDLINE:
        warnings += [n for n in split.notes if n.startswith("--select-on")]  # the user's number could not be met
    warnings += _recipe_warnings(recipe, cfg, len(train_ds))
    ecfg = _report_config(quick, spec, norm, eval_steps, batch_size, kw["seed"])
    _print_plan(train_ds, val_ds, eval_ds, cfg, spec, ecfg, recipe, kw["quiet"])
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}")
    saver = Saver(out_file.with_name(out_file.name + ".partial"), resume=resume, every_steps=save_every,
                  fingerprint=fingerprint({"base": loaded.base.sha256, "data": train_ds.fingerprint(),
                                           "patches": loaded.patched.patch_specs(), "fit": asdict(cfg),
                                           "attack": spec.record(), "device": device.type,
                                           "val": val_ds.fingerprint() if val_ds is not None else None}))
    saver.check_start()
    parent = loaded.patched.base_copy() if cfg.full else None
    t0 = time.time()
    info: dict = {}
    estimate: dict = {}

    def on_estimate(est: dict) -> None:
        report_s = est["unit_seconds"] * report_units(ecfg, len(eval_ds))
        estimate.update(est, report_seconds=report_s)
        if not kw["quiet"]:
            err_console.print(f"estimated time left: training {F.fmt_seconds(est['train_seconds'])}"
                              + (f" + validation {F.fmt_seconds(est['validation_seconds'])}" if val_ds else "")
                              + f" + report {F.fmt_seconds(report_s)} = "
                              f"{F.fmt_seconds(est['seconds'] + report_s)} (measured from the first "
                              f"{est['timed_steps']} steps: {est['seconds_per_step']:.2f} s per step)")

    with ProgressView(kw["quiet"]) as progress, StopFlag().installed() as stop:
        logs = F.fit(loaded.patched, train_ds, spec, cfg, device, progress, saver=saver, stop=lambda: bool(stop),
                     val=val_ds, info=info, cache_dir=out_file.parent, on_estimate=on_estimate)
    train_seconds = time.time() - t0
    if "cache" in info and not kw["quiet"]:
        err_console.print(f"cache: {info['cache']}")
    loaded.patched.set_route(default_route)
    training = api.training_record(cfg, spec, logs, train_ds, opts, recipe, split, val_ds)
    manifest = Manifest(
        arch=loaded.base.arch, arch_kwargs=loaded.base.arch_kwargs, input=loaded.spec.to_json(),
        patches=loaded.patched.patch_specs(), base_sha256=loaded.base.sha256, training=training,
        route=default_route, base_modified=cfg.full, parent_sha256=loaded.base.sha256 if cfg.full else "",
    )
    try:
        save_patched(out_file, loaded.patched.to("cpu"), manifest)
    except RunError as e:
        if saver.path.exists():
            raise RunError(f"{e.message}; the trained state is kept in '{saver.path}': fix that and rerun the same "
                           "command with --resume to write it without training again") from None
        raise
    saver.clear()
    loaded.patched.to(device)
    n_params = _announce_written(loaded, cfg, out_file, train_seconds)

    t1 = time.time()
    with ProgressView(kw["quiet"]) as progress:
        result = E.evaluate(loaded.patched, eval_ds, ecfg, device, has_patches=True, progress=progress,
                            reference=parent.to(device) if parent is not None else None)
    report_seconds = time.time() - t1
    full_cmd = _full_eval_command(out_file, loaded, eval_data, spec)
    rep = R.build("patch", result, R.data_record(eval_ds, warnings), R.attack_settings(result),
                  R.environment(str(device), kw["seed"], kw["deterministic"]),
                  {"checkpoint": str(out_file), "checkpoint_sha256": sha256_file(out_file), "eps": spec.eps,
                   "norm": spec.norm, "training": manifest.training, "patches": manifest.patches,
                   "train_seconds": train_seconds, "report_seconds": report_seconds,
                   "estimate": {k: v for k, v in estimate.items() if k.endswith("seconds")},
                   "trainable_parameters": n_params, "route": default_route,
                   "epoch_log": [asdict(e) for e in logs], "cache": info, "base_modified": cfg.full,
                   "method": method, "preset": recipe.record() if recipe else None,
                   "report_budget": {"budget": report_budget, "verdict": not quick,
                                     "note": QUICK_NOTE if quick else "reference budgets of the training attack",
                                     "full_evaluation": full_cmd}})
    R.render_table(rep, err_console)
    if not kw["quiet"]:
        err_console.print(f"report: {'quick check, not a verdict' if quick else 'full'} ({report_seconds:.0f}s); "
                          f"training took {train_seconds:.0f}s. Full verdict:\n  {full_cmd}")
    if report_path:
        R.write(rep, report_path)
    out(str(out_file))


QUICK_NOTE = ("quick check: white-box APGD-CE with a small step budget (and its transfer from the base) on a few "
              "hundred held-out images; a weak attack gives an upper bound of robust accuracy, not a verdict: run "
              "the full_evaluation command")


def _recipe_warnings(recipe, cfg: F.FitConfig, n_train: int) -> list[str]:
    warnings = []
    n_steps = -(-n_train // cfg.batch_size) * cfg.epochs
    if n_steps < FEW_STEPS:
        src = f" (--epochs {cfg.epochs} is preset {recipe.name}'s)" if recipe and "epochs" in recipe.options else ""
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
    parameter gradients and skips samples already broken, so the three cost about two training-step units:
    measured on the demo, this gives 20 s for a report that took 13 s (and 94 s for 57 s under load)."""
    steps = ecfg.steps or A.info(ecfg.attacks[0]).steps
    return n * len(ecfg.attacks) * (2 * 3 * (steps + 1) + 6)


def _print_plan(train_ds, val_ds, eval_ds, cfg: F.FitConfig, spec: A.AttackSpec, ecfg: E.EvalConfig, recipe,
                quiet: bool) -> None:
    if quiet:
        return
    per_epoch = -(-len(train_ds) // cfg.batch_size)
    against = ("the model being trained" if cfg.adaptive else "the frozen base, once (transfer)")
    att = f"{spec.name}" + (f"-{spec.steps}" if spec.steps and spec.name != "fgsm" else "")
    units = F.train_units(cfg, spec)
    lines = [f"recipe: {f'preset {recipe.name}' if recipe else 'custom options'}, training for the "
             f"{api.effective_threat_model(cfg)} threat model",
             f"training: {len(train_ds):,} images, {cfg.epochs} epochs x {per_epoch} steps of {cfg.batch_size} = "
             f"{cfg.epochs * per_epoch:,} optimiser steps; attack {att} against {against}; about {units:.0f} "
             "forward-pass equivalents per image per step"]
    if val_ds is not None:
        lines.append(f"validation: {len(val_ds):,} held-out images after every {cfg.validate_every} epoch(s) "
                     "(PGD-10 white-box and transfer)")
    lines.append(f"report: {len(eval_ds):,} images, {', '.join(ecfg.attacks)}"
                 f"{f' {ecfg.steps} steps' if ecfg.steps else ''}, white-box then transfer")
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
    if loaded.base.arch:
        parts += ["--arch", loaded.base.arch]
    if loaded.base.arch_kwargs:
        parts += ["--arch-kwargs", json.dumps(loaded.base.arch_kwargs, sort_keys=True)]
    return " ".join(shlex.quote(p) for p in parts)


def _report_data(loaded, ds_all, rest_idx, eval_data, eval_samples, kw) -> tuple[hdata.Dataset, list[str]]:
    """The data of the patch report: --eval-data, else the part of --data outside the subset."""
    warnings = []
    if eval_data:
        eval_ds = load_data(loaded, eval_data, _dopts(kw))
        hdata.check_labels(eval_ds, loaded.spec.num_classes)
    else:
        if len(rest_idx) == 0:
            raise InputError("no report data: --data has nothing left outside the training and validation images; "
                             "pass --eval-data, a smaller --subset or a larger --holdout")
        eval_ds = ds_all.take(rest_idx)
        warnings.append("report data is held-out images of --data; the base may have been trained on them, so its "
                        "clean accuracy there may be optimistic")
    if eval_samples and eval_samples < len(eval_ds):
        idx, _ = hdata.stratified_split(eval_ds.labels, int(eval_samples), kw["seed"])
        eval_ds = eval_ds.take(idx)
    return eval_ds, warnings


# ---------------------------------------------------------------- eval


class BatchSize(click.ParamType):
    """A positive integer, or `auto` (the largest power of two that fits, probed before the evaluation)."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            v = int(str(value).strip())
        except ValueError:
            v = 0
        if v < 1:
            self.fail(f"must be a positive integer or auto, got '{value}'", param, ctx)
        return v


def _auto_batch(batch_size, loaded, ds, device, world, quiet: bool) -> int:
    if batch_size != "auto":
        return batch_size
    x, y = hdata.to_float(ds.images[:64]), ds.labels[:64]
    bs = E.find_batch_size(loaded.patched, x, y, device)
    if world.active:  # one block layout for every rank: the smallest that fits everywhere
        import torch.distributed as dist

        t = torch.tensor([bs], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bs = int(t.item())
    if not quiet:
        err_console.print(f"batch size: auto -> {bs}", highlight=False)
    return bs


def _load_surrogate(path: str | None, kw: dict, ds, device):
    """The --surrogate model (plain or harden checkpoint, the model's --arch), taking [0, 1] pixels, in eval mode."""
    if not path:
        return None
    V.regular_input(path, "--surrogate")
    loaded = load_model(path, _mopts(kw))
    finish_spec(loaded, ds, device)
    return loaded.patched.eval()


@main.command("eval", cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--data", help="Evaluation data (or `eval_data` in harden.toml).")
@click.option("--eval-data", hidden=True)
@click.option("--attack", "attack_names", multiple=True, help="Attack(s): repeat or comma list. Default: apgd-ce.")
@click.option("--precision", type=click.Choice(list(E.PRECISIONS)), default="fp32", show_default=True,
              help="Precision of the attacks' passes (autocast); examples are scored in fp32. Lower precision is "
                   "faster on GPUs but its gradients can weaken attacks: the report says so.")
@click.option("--suite", type=click.Choice(list(A.SUITE_VERSIONS)),
              help="AutoAttack as the reference code runs it: standard (= --attack autoattack), plus, rand.")
@click.option("--eps", default="8/255", show_default=True)
@click.option("--norm", default="Linf", show_default=True, type=click.Choice(["Linf", "L2"]))
@click.option("--steps", type=int, help="Steps of iterative attacks (default: each one's reference budget).")
@click.option("--restarts", type=int, default=1, show_default=True)
@click.option("--queries", type=int, default=5000, show_default=True, help="Square's query budget.")
@click.option("--threat", default="all", show_default=True,
              help="Threat models: whitebox, adaptive (BPDA through patches that may mask gradients), surrogate "
                   "(transfer from --surrogate), transfer (from the base), blackbox (Square), a comma list, or all.")
@click.option("--surrogate", type=click.Path(dir_okay=False),
              help="A checkpoint to transfer attacks from (e.g. an adversarially fine-tuned copy of the base, "
                   "`harden patch --method adv-train`): attacks computed on it, scored on the model (same --arch).")
@click.option("--max-samples", type=int, help="Seeded stratified subset of the data.")
@click.option("--eps-sweep", help="Comma list of eps for a robustness curve (first iterative attack, white-box).")
@click.option("--fail-under", help="Gates, e.g. clean=0.85,robust=0.60 (robust = white-box worst case; needs an "
                                    "iterative white-box attack in the run).")
@click.option("--allow-weak-gate", is_flag=True,
              help="Let --fail-under robust/transfer gate on a run without an iterative attack in that threat "
                   "model (e.g. FGSM only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--report", "report_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Write the report: .json, .md or .html (repeatable).")
@click.option("--batch-size", default=256, show_default=True, type=BatchSize(),
              help="Images per attack batch, or auto: the largest power of two that fits in memory (probed).")
@click.option("--no-checks", is_flag=True, help="Skip the sanity checks (they cost a few extra attacks).")
@click.option("--resume", is_flag=True, help="Continue an interrupted evaluation with the same settings.")
@click.option("--force", is_flag=True, help="Overwrite existing --report files.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Folder for resumable evaluation state (default: $HARDEN_CACHE_DIR, else beside the first "
                   "--report; with neither, nothing is saved and nothing can be resumed).")
@click.option("--smooth-grad", help="softplus:ALPHA — gradient attacks see the ReLUs with a parametric-softplus "
                                    "backward (probes ReLU-induced gradient masking).")
@click.option("--route", type=click.Choice(["adv", "main"]),
              help="Auxiliary-BN route to evaluate (default: the one stored in the checkpoint).")
@click.option("--parent", type=click.Path(dir_okay=False),
              help="The original checkpoint of a fully fine-tuned model (adv-train, advprop, advamd): the base "
                   "rows and transfer attacks use it.")
@click.option("--base-cache", type=click.Path(file_okay=False),
              help="Folder that keeps what depends on the base alone (its attack rows, the transfer examples) "
                   "and reuses it when another model on the same base is evaluated with the same data and "
                   "attack settings: evaluating many variants of one base costs the base's share once.")
@click.option("--defense", default="static", show_default=True, type=click.Choice(["static", "adaptive"]),
              help="adaptive: evaluate inference-time post-training (harden predict --adaptive) instead: clean and "
                   "robust accuracy on adversarial examples of the static model, plus an end-to-end attack on "
                   "--e2e-samples inputs. Uses the first --attack and --eps.")
@click.option("--e2e-samples", default=20, show_default=True, type=int,
              help="Inputs attacked end to end through the adaptive procedure (0 = none; each costs minutes).")
@click.option("--e2e-steps", default=10, show_default=True, type=int, help="PGD steps of that end-to-end attack.")
@(lambda f: adaptive_options(f, with_eps=False))
@model_options
@data_options
def eval_cmd(model, data, eval_data, attack_names, precision, suite, eps, norm, steps, restarts, queries, threat, surrogate, max_samples,
             eps_sweep, fail_under, allow_weak_gate, as_json, report_paths, batch_size, no_checks, resume, smooth_grad,
             route, parent,
             base_cache, defense, e2e_samples, e2e_steps, reference_data, neighbour, neighbour_steps, post_train,
             iterations, post_batch, adapt, post_lr, **kw):
    """Evaluate robustness: attacks, threat models, per-sample worst case, sanity checks, gates."""
    model = _check_model_arg(model)
    data = data or eval_data
    if not data:
        raise click.UsageError("missing --data (or `eval_data` in harden.toml)")
    thresholds = R.parse_fail_under(fail_under)
    threats = api.parse_threats(threat, "--threat")
    if "surrogate" in [t.strip() for t in threat.split(",")] and not surrogate:
        raise InputError("--threat surrogate needs --surrogate CHECKPOINT (a model to transfer attacks from)")
    for p in report_paths:
        R.check_path(p)
    V.check_run(click.get_current_context(), [("--report", p) for p in report_paths], kw["force"])
    raw = list(attack_names) + ([A.SUITE_VERSIONS[suite]] if suite else [])
    names = A.parse_attack_list(raw or ["apgd-ce"])
    if defense != "adaptive":
        R.check_gate_attacks(thresholds, names, threats, allow_weak_gate)
    sweep = [A.parse_eps(e) for e in eps_sweep.split(",")] if eps_sweep else None
    torch.manual_seed(kw["seed"])
    set_deterministic(kw["deterministic"])
    world = D.world()
    device = D.init(world, pick_device(kw["device"]))
    if not world.main:
        kw["quiet"] = True
    loaded = load_model(model, _mopts(kw))
    reference = load_parent(loaded, parent, _mopts(kw))
    if route:
        if not loaded.patched.has_auxbn:
            raise InputError(f"--route {route}: '{model}' has no auxiliary BNs")
        loaded.patched.set_route(route)
    ds = load_data(loaded, data, _dopts(kw))
    finish_spec(loaded, ds, device)
    if reference is not None:
        reference.to(device)
    surrogate_model = _load_surrogate(surrogate, kw, ds, device)
    _announce(ds, kw["quiet"])
    subset = hdata.parse_subset(kw["subset"])
    if max_samples and max_samples < len(ds):
        subset = max_samples
    if subset is not None:
        idx, _ = hdata.stratified_split(ds.labels, subset, kw["seed"])
        ds = ds.take(idx)
    if defense == "adaptive":
        _eval_adaptive(model, loaded, ds, names, eps, norm, steps, kw, device, report_paths, as_json, e2e_samples,
                       e2e_steps, (reference_data, neighbour, neighbour_steps, post_train, iterations, post_batch,
                                   adapt, post_lr))
        return
    batch_size = _auto_batch(batch_size, loaded, ds, device, world, kw["quiet"])
    ecfg = E.EvalConfig(attacks=names, eps=A.parse_eps(eps), norm=norm, steps=steps, restarts=restarts,
                        queries=queries, threats=threats, batch_size=batch_size, seed=kw["seed"], eps_sweep=sweep,
                        checks=not no_checks, smooth_grad=A.parse_smooth_grad(smooth_grad),
                        overrides=A.suite_settings(raw), precision=precision)
    model_sha = sha256_file(Path(model))
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "eval": asdict(ecfg),
                      "device": device.type, "route": loaded.patched.current_route, "parent": parent,
                      "surrogate": sha256_file(Path(surrogate)) if surrogate else None})
    state_dir = V.eval_state_dir(kw["state_dir"], list(report_paths))
    shard = f"-rank{world.rank}of{world.size}" if world.active else ""
    state = state_dir / f".harden-eval-{fp[:16]}{shard}.partial" if state_dir is not None else None
    store = EvalStore(state, fp, resume)
    try:
        with ProgressView(kw["quiet"]) as progress, sigterm_as_interrupt():
            result = E.evaluate(loaded.patched, ds, ecfg, device, has_patches=loaded.has_patches,
                                progress=progress, store=store, reference=reference,
                                base_cache=Path(base_cache) if base_cache else None, surrogate=surrogate_model,
                                world=world)
    except KeyboardInterrupt:
        store.flush()
        if state is None:
            raise Interrupted("interrupted; no progress saved (pass --state-dir DIR or --report to make an evaluation "
                              "resumable)") from None
        raise Interrupted(f"interrupted: progress saved to '{state}'; rerun the same command with --resume") from None
    if result is None:  # another rank of a sharded run: rank 0 reports
        store.clear()
        D.finish(world)
        return
    extra = {"checkpoint": model, "checkpoint_sha256": model_sha, "eps": ecfg.eps, "norm": norm}
    if world.active:
        extra["processes"] = world.size
    if surrogate:
        extra["surrogate"] = {"checkpoint": surrogate, "sha256": sha256_file(Path(surrogate))}
    if result.get("base_cache"):
        extra["base_cache"] = result["base_cache"]
    if loaded.manifest is not None:
        extra["patches"] = loaded.manifest.patches
        extra["training"] = loaded.manifest.training
        extra["base_modified"] = loaded.manifest.base_modified
        if loaded.patched.has_auxbn:
            extra["route"] = loaded.patched.current_route
    env = R.environment(str(device), kw["seed"], kw["deterministic"])
    notes = [] if precision == "fp32" else [
        f"attacks ran in {precision} (autocast): low-precision gradients can weaken attacks, so robust accuracy may "
        "be overstated; rerun with --precision fp32 for the verdict"]
    extra["precision"] = precision
    rep = R.build("eval", result, R.data_record(ds, notes), R.attack_settings(result), env, extra)
    missed = R.gate(rep, thresholds)
    rep["gates"] = {"thresholds": thresholds, "missed": missed}
    rep["summary"] = R.summary(rep)
    R.render_table(rep, err_console)
    for p in report_paths:
        R.write(rep, p)
    store.clear()
    D.finish(world)
    if as_json:
        out(json.dumps(rep, indent=2, sort_keys=True))
    if missed:
        raise ThresholdError("--fail-under missed: " + "; ".join(missed))


def _eval_adaptive(model, loaded, ds, names, eps, norm, steps, kw, device, report_paths, as_json, e2e_samples,
                   e2e_steps, adaptive_args) -> None:
    from .adaptive import evaluate_adaptive

    for p in report_paths:
        if Path(p).suffix.lower() != ".json":
            raise InputError(f"--defense adaptive writes JSON reports only, not '{p}'")
    reference_data, *rest = adaptive_args
    pred = _adaptive(loaded, reference_data, kw, device, eps, *rest)
    spec = A.AttackSpec(name=names[0], eps=A.parse_eps(eps), norm=norm, steps=steps, seed=kw["seed"],
                        n_classes=loaded.spec.num_classes)
    x, y = hdata.to_float(ds.images), ds.labels
    with ProgressView(kw["quiet"] or as_json) as progress:
        res = evaluate_adaptive(pred, x, y, spec, e2e_samples, e2e_steps, progress)
    rep = {"schema": "harden.adaptive-report/1", "harden_version": __version__, "checkpoint": model,
           "patches": loaded.manifest.patches if loaded.manifest else [], "data": R.data_record(ds, []),
           "environment": R.environment(str(device), kw["seed"], kw["deterministic"]), **res}
    st, ad, e2e = res["static"], res["adaptive_predictor"], res["end_to_end"]
    from rich.table import Table

    t = Table(title=f"adaptive post-training: {res['n']} samples, {spec.label} eps={spec.eps:g}")
    for col in ("predictor", "measure", "threat model", "accuracy"):
        t.add_column(col)
    t.add_row("static", "clean", "—", R.pct(st["clean"]))
    t.add_row("static", f"after {spec.label}", "white-box on the static model", R.pct(st["robust_static_whitebox"]))
    t.add_row("adaptive", "clean", "—", R.pct(ad["clean"]))
    t.add_row("adaptive", f"after {spec.label}", "static transfer (paper)", R.pct(ad["robust_static_transfer"]))
    t.add_row("adaptive", "neighbour accuracy", "static transfer", R.pct(ad["neighbour_accuracy_adversarial"]))
    if e2e:
        t.add_row("adaptive", f"after end-to-end PGD-{e2e['steps']}", f"end to end ({e2e['n']} samples)",
                  R.pct(e2e["robust"]))
    err_console.print(t)
    err_console.print(f"{ad['seconds_per_image']:.2f} s per image; post-trained {ad['post_trained_fraction']:.0%} "
                      "of inputs")
    for p in report_paths:
        atomic_write(Path(p), lambda tmp: Path(tmp).write_text(json.dumps(rep, indent=2, sort_keys=True)))
    if as_json:
        out(json.dumps(rep, indent=2, sort_keys=True))


# ---------------------------------------------------------------- predict


def _adaptive(loaded, reference_data, kw, device, eps_text, neighbour, neighbour_steps, post_train, iterations,
              post_batch, adapt, post_lr):
    from .adaptive import AdaptiveConfig, AdaptivePredictor

    if not reference_data:
        raise click.UsageError("--adaptive needs --reference-data (labelled training data to post-train on)")
    cfg = AdaptiveConfig(eps=A.parse_eps(eps_text), neighbour=neighbour, neighbour_steps=neighbour_steps,
                         iterations=iterations, batch=post_batch, post_train=post_train, adapt=adapt, lr=post_lr,
                         seed=kw["seed"])
    ref = load_data(loaded, reference_data, _dopts(kw))
    hdata.check_labels(ref, loaded.spec.num_classes)
    return AdaptivePredictor(loaded.patched, ref, cfg, device)


@main.command(cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--data", help="Labelled images to certify (folder, tensor file, fashion-mnist:test).")
@click.option("--sigma", type=float, default=0.25, show_default=True, help="Noise level σ (pixel units).")
@click.option("--n0", type=int, default=100, show_default=True, help="Noise draws that select the class.")
@click.option("--n", "n_samples", type=int, default=100_000, show_default=True,
              help="Noise draws that bound its probability (independent of the first).")
@click.option("--alpha", type=float, default=0.001, show_default=True, help="Failure probability of a certificate.")
@click.option("--batch-size", type=int, default=1000, show_default=True, help="Noisy copies per forward pass.")
@click.option("--max-samples", type=int, help="Seeded stratified subset of the data.")
@click.option("--tsv", "tsv_path", type=click.Path(dir_okay=False),
              help="Per-sample rows: idx, label, predict, radius, correct, time (locuslab/smoothing's format).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Report: .json or .md.")
@click.option("--force", is_flag=True, help="Overwrite existing --tsv/--report files.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--resume", is_flag=True, help="Continue an interrupted certification with the same settings.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Folder for resumable state (default: $HARDEN_CACHE_DIR, else beside --report or --tsv).")
@model_options
@data_options
def certify(model, data, sigma, n0, n_samples, alpha, batch_size, max_samples, tsv_path, report_path, force, as_json,
            resume, state_dir, **kw):
    """Certified L2 robustness of the smoothed model (randomized smoothing, Cohen et al. 2019): per sample, the
    class and a radius within which no perturbation changes it, with probability 1 - alpha over the noise."""
    from . import certify as C

    model = _check_model_arg(model)
    if not data:
        raise click.UsageError("missing --data (labelled images to certify)")
    V.check_run(click.get_current_context(), [("--tsv", tsv_path), ("--report", report_path)], force)
    if report_path and Path(report_path).suffix.lower() not in (".json", ".md"):
        raise InputError(f"--report '{report_path}': certify writes .json or .md reports")
    cfg = C.SmoothingConfig(sigma=sigma, n0=n0, n=n_samples, alpha=alpha, batch_size=batch_size, seed=kw["seed"])
    device = pick_device(kw["device"])
    loaded = load_model(model, _mopts(kw))
    ds = load_data(loaded, data, _dopts(kw))
    finish_spec(loaded, ds, device)
    if max_samples and max_samples < len(ds):
        ds = ds.take(hdata.stratified_split(ds.labels, max_samples, kw["seed"])[0])
    model_sha = sha256_file(Path(model))
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "certify": asdict(cfg), "device": device.type})
    folder = V.eval_state_dir(state_dir, [p for p in (report_path, tsv_path) if p])
    state = folder / f".harden-certify-{fp[:16]}.partial" if folder is not None else None
    store = EvalStore(state, fp, resume)
    rows = list((store.get("rows") or {}).get("rows", []))
    if rows and not kw["quiet"]:
        err_console.print(f"resuming: {len(rows)} of {len(ds)} samples already certified", highlight=False)

    def keep(row: dict) -> None:
        rows.append(row)
        store.put("rows", {"rows": list(rows)})
    try:
        with ProgressView(kw["quiet"]) as progress, sigterm_as_interrupt():
            res = C.certify(loaded.patched, hdata.to_float(ds.images), ds.labels, cfg, loaded.spec.num_classes,
                            device, progress, done=list(rows), on_row=keep)
    except KeyboardInterrupt:
        store.flush()
        if state is None:
            raise Interrupted("interrupted; no progress saved (pass --state-dir DIR, --report or --tsv to make a "
                              "certification resumable)") from None
        raise Interrupted(f"interrupted: {len(rows)} samples saved to '{state}'; rerun the same command with "
                          "--resume") from None
    s = res.summary()
    rep = {"schema": "harden.certify-report/1", "harden_version": __version__, "checkpoint": model,
           "checkpoint_sha256": model_sha, "data": R.data_record(ds, []),
           "threat_model": f"certified: L2 radius of the smoothed model (σ = {sigma:g}), with probability "
                           f"{1 - alpha:g} over the noise", "summary": s, "rows": res.rows,
           "environment": R.environment(str(device), kw["seed"], kw["deterministic"])}
    err_console.print(f"{s['n']} samples, σ {sigma:g}, N {n_samples:,}, α {alpha:g}: smoothed clean "
                      f"{100 * s['clean_accuracy_smoothed']:.1f}%, abstained {100 * s['abstention_rate']:.1f}%; "
                      "certified at radius " + ", ".join(f"{r}: {100 * v:.1f}%"
                                                         for r, v in s["certified_accuracy"].items())
                      + f" (largest radius N allows: {s['max_certifiable_radius']:g})")
    if tsv_path:
        atomic_write(Path(tsv_path), lambda tmp: Path(tmp).write_text(res.to_tsv()))
    if report_path:
        as_md = Path(report_path).suffix.lower() == ".md"
        text = _certify_md(rep) if as_md else json.dumps(rep, indent=2, sort_keys=True)
        atomic_write(Path(report_path), lambda tmp: Path(tmp).write_text(text))
    store.clear()
    if as_json:
        out(json.dumps(rep, indent=2, sort_keys=True))


def _certify_md(rep: dict) -> str:
    s = rep["summary"]
    lines = ["## harden certify report", "", f"Model `{Path(rep['checkpoint']).name}` (sha256 "
             f"`{rep['checkpoint_sha256'][:16]}…`), data `{rep['data']['source']}` ({s['n']} samples).", "",
             f"Threat model: {rep['threat_model']}. n0 {s['n0']}, N {s['N']}, α {s['alpha']}, seed {s['seed']}; "
             f"largest certifiable radius with this N: {s['max_certifiable_radius']}.", "",
             f"Smoothed clean accuracy {100 * s['clean_accuracy_smoothed']:.1f}%, abstention "
             f"{100 * s['abstention_rate']:.1f}%.", "", "| radius | certified accuracy |", "|---|---|"]
    lines += [f"| {r} | {100 * v:.1f}% |" for r, v in s["certified_accuracy"].items()]
    return "\n".join(lines) + "\n"


@main.command(cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--data", help="Inputs: an image folder or a tensor file (labels optional).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout (JSON lines).")
@click.option("--max-samples", type=int, help="Only the first N inputs.")
@click.option("--adaptive", is_flag=True, help="Inference-time post-training per input (slow: seconds per image).")
@click.option("--smooth", "smooth_sigma", type=float,
              help="Predict with the smoothed model at noise σ (randomized smoothing's PREDICT: abstains unless a "
                   "binomial test separates the top two classes at --smooth-alpha).")
@click.option("--smooth-n", type=int, default=10_000, show_default=True, help="Noise draws per input for --smooth.")
@click.option("--smooth-alpha", type=float, default=0.001, show_default=True, help="Test level of --smooth.")
@adaptive_options
@model_options
@data_options
def predict(model, data, as_json, max_samples, adaptive, smooth_sigma, smooth_n, smooth_alpha, reference_data,
            adaptive_eps, neighbour, neighbour_steps, post_train, iterations, post_batch, adapt, post_lr, **kw):
    """Predict classes for inputs with a plain or patched checkpoint; --adaptive post-trains a copy per input.

    Prints `index<TAB>class<TAB>confidence` per input (class names where known), or JSON lines with --json.
    The checkpoint is never modified."""
    model = _check_model_arg(model)
    V.check_run(click.get_current_context(), [], False)
    if not data:
        raise click.UsageError("missing --data (the inputs to classify)")
    torch.manual_seed(kw["seed"])
    set_deterministic(kw["deterministic"])
    device = pick_device(kw["device"])
    loaded = load_model(model, _mopts(kw))
    ds = load_data(loaded, data, _dopts(kw), labels_required=False)
    finish_spec(loaded, ds, device)
    if max_samples:
        ds = ds.take(torch.arange(min(max_samples, len(ds))))
    x = hdata.to_float(ds.images)
    names = loaded.spec.classes
    if smooth_sigma is not None:
        from .certify import ABSTAIN, Smoothed, SmoothingConfig

        if adaptive:
            raise InputError("--smooth and --adaptive are two different predictors: give one")
        sm = Smoothed(loaded.patched, loaded.spec.num_classes,
                      SmoothingConfig(sigma=smooth_sigma, n=smooth_n, alpha=smooth_alpha, seed=kw["seed"]), device)
        rows = []
        for i in range(len(x)):
            c = sm.predict(x[i], i)
            rows.append({"index": i, "prediction": c, "confidence": None, "abstained": c == ABSTAIN})
    elif adaptive:
        pred = _adaptive(loaded, reference_data, kw, device, adaptive_eps, neighbour, neighbour_steps, post_train,
                         iterations, post_batch, adapt, post_lr)
        with ProgressView(kw["quiet"] or as_json) as progress:
            rows = pred.predict(x, progress)
    else:
        with torch.no_grad():
            probs = torch.cat([torch.softmax(E.finite_logits(loaded.patched(x[i:i + 256].to(device))), 1).cpu()
                               for i in range(0, len(x), 256)])
        rows = [{"index": i, "prediction": int(p.argmax()), "confidence": float(p.max())} for i, p in enumerate(probs)]
    labelled = bool((ds.labels != hdata.UNLABELLED).all())
    for r in rows:
        if r.get("abstained"):
            r["class"], r["confidence"] = "abstain", None
        elif names:
            r["class"] = names[r["prediction"]]
        if labelled:
            r["label"] = int(ds.labels[r["index"]])
        conf = "" if r["confidence"] is None else f"{r['confidence']:.4f}"
        out(json.dumps(r, sort_keys=True) if as_json else f"{r['index']}\t{r.get('class', r['prediction'])}\t{conf}")
    if labelled and not kw["quiet"]:
        hits = sum(r["prediction"] == r["label"] for r in rows)
        extra = (f"; post-trained {sum(r['post_trained'] for r in rows)} of {len(rows)} inputs, "
                 f"{sum(r['seconds'] for r in rows) / max(1, len(rows)):.2f} s per input") if adaptive else ""
        err_console.print(f"accuracy {hits}/{len(rows)} = {hits / max(1, len(rows)):.4f}{extra}")


# ---------------------------------------------------------------- export


@main.command(cls=ConfigCommand)
@click.argument("model", required=False)
@click.option("--format", "fmt", default="torchscript", show_default=True,
              type=click.Choice(["torchscript", "export", "onnx"]),
              help="torchscript (torch.jit), export (a torch.export program, .pt2), onnx (needs the onnx package).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Default: <stem>.ts.pt, <stem>.pt2 or <stem>.onnx.")
@click.option("--no-check", is_flag=True, help="Skip loading the file in a fresh interpreter to compare its logits.")
@click.option("--force", is_flag=True)
@model_options
def export(model, fmt, out_path, no_check, force, **kw):
    """Export a patched checkpoint to a file that runs without harden ([0,1] inputs), checked in a fresh
    interpreter against the patched model's logits."""
    from . import export as X

    model = _check_model_arg(model)
    target = Path(out_path) if out_path else X.default_path(model, fmt)
    V.check_run(click.get_current_context(), [("--out", target)], force)
    loaded = load_model(model, _mopts(kw))
    if loaded.manifest is None:
        raise InputError(f"'{model}' is not a harden-patched checkpoint")
    shape = loaded.spec.shape
    if not shape:
        raise InputError("the checkpoint records no input shape")
    X.export(loaded.patched, shape, fmt, target)
    if not no_check:
        diff = X.check_in_fresh_interpreter(target, fmt, loaded.patched, shape)
        if not kw["quiet"]:
            err_console.print(f"checked in a fresh interpreter: largest logit difference {diff:.2g}",
                              highlight=False)
    out(str(target))


def run() -> None:
    """Console entry point: stable exit codes, no tracebacks for expected failures."""
    try:
        main.main(standalone_mode=False, prog_name="harden")
    except (click.ClickException, HardenError) as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except torch.cuda.OutOfMemoryError:
        click.echo("Error: out of GPU memory: lower --batch-size or use --device cpu", err=True)
        sys.exit(3)
    except MemoryError:
        click.echo("Error: out of memory: lower --batch-size or --subset", err=True)
        sys.exit(3)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            click.echo("Error: disk full: free space and run again", err=True)
            sys.exit(3)
        raise
