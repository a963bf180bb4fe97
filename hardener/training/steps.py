"""The steps of a patch run that `training.run.patch_run` chains (and `api` re-exports for the library): the patches the
options ask for, attached; the training attack and the trainer's configuration; `--batch-size auto`; pseudo-labels
from the frozen base; the training record. Below `run` (the pipeline) and `api` (the library's facade)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

import torch

from .. import attacks as A
from .. import data as hdata
from .. import methods as M
from ..errors import InputError
from ..evaluation import threats as E
from ..io.checkpoint import (
    load_onto,
    read_manifest,
    read_safetensors,
    sha256_file,
    tensor_digest,
)
from ..options import optspec
from ..options.patch_options import PatchOptions
from ..options.recipe import Split, parse_methods
from ..options.validate import regular_input
from ..patches import (
    INPUT_SITE,
    PATCH_KINDS,
    PatchedModel,
    Site,
    select_bn_sites,
    select_sites,
)
from ..patches import cost as C
from ..patches.attach import Disabled
from ..patches.layers import site_shape
from . import fit as F
from .cache import parse_bytes
from .record import TrainingRecord


def attach_patches(patched: PatchedModel, infos: list, opts: PatchOptions,
                   say: Callable[[str], None] = lambda s: None) -> str | None:
    """Build the patches the options ask for and attach them (the base itself is never edited). Every site is
    resolved before the first patch is attached. Returns what `--budget` chose (None without one)."""
    methods = parse_methods(opts.method, opts.bn, opts.at or opts.at_regex)
    bn = opts.bn or "all"
    ran = {i.name for i in infos if i.calls}  # norms the eval-mode forward never calls get no twin
    chosen = select_bn_sites(patched.net, bn, ran, say) if methods.auxbn else []
    sites = []
    if methods.site_kind is not None:
        sites = select_sites(patched.net, infos, opts.at, opts.at_regex, opts, default_kind=methods.site_kind,
                             avoid=chosen, say=say)
    shapes = {i.name: site_shape(i) for i in infos}
    shapes[INPUT_SITE] = list(patched.model.spec.shape)
    twins: list[str] = []
    if methods.auxbn:
        group = bn.strip() in ("all", "auto")
        taken = [s for s in chosen if s in {site for _, site in sites}]
        if taken and group:  # a site holds one patch: the patch there stays, the BN gets no twin
            say(f"--bn {bn}: {', '.join(taken)} already carry a site patch; no twin there")
        twins = [s for s in chosen if not (group and s in taken)]
    budget, note = C.parse_budget(opts.budget), None
    if budget is not None:  # the recipe sized to the budget: which sites, and the options to build them with
        sites, opts, note = C.fit_budget(patched, sites, shapes, opts, budget, bool(twins))
        say(note)
    for kind, site in [*sites, *((methods.bn_kind, s) for s in twins)]:
        cls = PATCH_KINDS[kind]
        module = patched.net if site == INPUT_SITE else patched.net.get_submodule(site)
        patched.attach(site, cls.build(Site(site, module, shapes.get(site)), cls.make_config(opts)))
    return note


# --batch-size auto: the largest of these batches that still gives MIN_AUTO_STEPS optimiser steps (else the smallest).
# On the demo's 1,600 images, 10 epochs of 128 are 130 steps and underfit; of 32, 500 steps bought 7 points of
# white-box accuracy on validation at the same time per image (bench/RESULTS.md, "The ordinary path").
AUTO_BATCH = (128, 64, 32)
MIN_AUTO_STEPS = 400


def auto_batch_size(epoch_images: int, epochs: int) -> int:
    """The training batch `--batch-size auto` picks for `epoch_images` images per epoch over `epochs` epochs."""
    for b in AUTO_BATCH:
        if -(-epoch_images // b) * epochs >= MIN_AUTO_STEPS:
            return b
    return AUTO_BATCH[-1]


def settle_batch_size(cfg: F.FitConfig, opts: PatchOptions, n_train: int) -> F.FitConfig:
    """`cfg` with `--batch-size auto` resolved for the final training set (`n_train` images, pseudo-labelled ones
    included); the user's number is kept as it is."""
    from dataclasses import replace

    if opts.batch_size != "auto":
        return cfg
    return replace(cfg, batch_size=auto_batch_size(cfg.epoch_images(n_train), cfg.epochs))


def training_setup(opts: PatchOptions, n_classes: int,
                   teacher: dict | None = None) -> tuple[A.AttackSpec, F.FitConfig]:
    """The training attack and the trainer's configuration of `opts` (`teacher`: the record of the robust teacher
    `load_teacher` loaded)."""
    methods = parse_methods(opts.method, opts.bn, opts.at or opts.at_regex)
    if opts.twin_stats != "batch" and not methods.auxbn:
        raise InputError(f"--twin-stats {opts.twin_stats} sets how BN twins train, and the recipe has none: add auxbn "
                         "to --method (or give --bn), or drop --twin-stats")
    A.expand([opts.attack_name])
    spec = A.AttackSpec(name=opts.attack_name, eps=A.parse_eps(str(opts.eps)), norm=opts.norm, steps=opts.steps,
                        alpha=opts.alpha, seed=opts.seed, n_classes=n_classes,
                        smooth_grad=A.parse_smooth_grad(opts.smooth_grad),
                        radius=A.info(opts.attack_name).train_radius)
    cfg = F.FitConfig(epochs=opts.epochs, batch_size=AUTO_BATCH[0] if opts.batch_size == "auto" else opts.batch_size,
                      lr=opts.lr if opts.lr is not None else M.get(methods.fit_method).default_lr,
                      lam=opts.lam, mu=opts.mu, gamma=opts.gamma, adversary=opts.adversary, augment=opts.augment,
                      seed=opts.seed, method=methods.fit_method, eps_warmup=opts.eps_warmup, ema=opts.ema,
                      twin_stats=opts.twin_stats,
                      select=bool(opts.select_on), validate_every=opts.validate_every, cache=opts.cache,
                      noise_sigma=opts.noise_sigma, precision=opts.precision, teacher=teacher,
                      cache_limit=opts.cache_limit if isinstance(opts.cache_limit, int)
                      else parse_bytes(opts.cache_limit, "--cache-limit"), **method_options(opts))
    return spec, cfg


def load_teacher(patched: PatchedModel, ds: hdata.Dataset, teacher: Any, device: torch.device,
                 ) -> tuple[torch.nn.Module, dict]:
    """The robust teacher of `--loss rslad` (RSLAD, Zi et al. 2021), frozen, in eval mode, on `device`, and its
    record. A path is a checkpoint `harden patch` wrote from this run's base (`patched`, before any patch is
    attached): its base tensors must be the base's, bit for bit (its manifest's digest is compared first), and its
    patches are attached to a copy of the base, as `hardener.load(path, model=...)` does (no arch needed); the record
    is its file name and sha256. A `PatchedModel` must sit on the same base; another module, taking the same [0, 1]
    pixels, is taken as it is (a copy: the caller's stays as it was). Either must give the base's class count on the
    data's input shape. Errors name `--teacher` (the library's `teacher=`: `options.wording`)."""
    import copy
    from pathlib import Path


    what = "--teacher"
    base_digest = tensor_digest(patched.base_state_dict())
    if isinstance(teacher, (str, Path)):
        try:
            model, rec = _teacher_file(Path(teacher), patched, base_digest, what)
        except InputError as e:
            text = e.message if e.message.startswith(what) else f"{what} '{teacher}': {e.message}"
            raise InputError(text, e.hint) from None
    elif isinstance(teacher, PatchedModel):
        if tensor_digest(teacher.base_state_dict()) != base_digest:
            raise InputError(f"{what} sits on another base than the model being patched: distil from a model "
                             "patched from the same base")
        model = teacher.clone()
        rec = {"module": "PatchedModel", "tensors_sha256": tensor_digest({**teacher.base_state_dict(),
                                                                         **teacher.patch_state_dict()})}
    elif isinstance(teacher, torch.nn.Module):
        try:
            model = copy.deepcopy(teacher)
        except Exception as e:  # noqa: BLE001 - whatever the module's own __deepcopy__ raises
            raise InputError(f"{what}: cannot copy the module ({type(e).__name__}); pass a deep-copyable module or "
                             "a patched checkpoint path") from None
        rec = {"module": type(teacher).__name__, "tensors_sha256": tensor_digest(teacher.state_dict())}
    else:
        raise InputError(f"{what} must be a patched checkpoint (.safetensors written by harden) or an nn.Module, got "
                         f"{type(teacher).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device).eval()
    _check_teacher_output(model, ds, patched.model.spec.num_classes, device, what)
    return model, rec


def _teacher_file(path, patched: PatchedModel, base_digest: str, what: str) -> tuple[torch.nn.Module, dict]:
    """A patched checkpoint of `patched`'s base as a teacher (see `load_teacher`), and its record: its class count
    (from its manifest) and base checked before anything is built."""
    path = regular_input(path, what)
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"{what} '{path}' is not a harden-patched checkpoint (no manifest): pass a .safetensors "
                         "file `harden patch` wrote from this base")
    if manifest.base_modified:
        raise InputError(f"{what} '{path}' is a fully fine-tuned model (method "
                         f"{manifest.training.get('config', {}).get('method', '?')}), not patches on this base: "
                         "distil from a patched checkpoint of the same base")
    n, theirs_n = patched.model.spec.num_classes, manifest.input.get("num_classes")
    if n is not None and theirs_n is not None and theirs_n != n:
        raise InputError(f"{what} '{path}' has {theirs_n} classes but the model being patched has {n}: distil from "
                         "a checkpoint patched from the same base")
    theirs = manifest.base_tensors_sha256 or tensor_digest(
        {k: v for k, v in read_safetensors(path).items() if not k.startswith("harden.")})
    if theirs != base_digest:
        raise InputError(f"{what} '{path}' was patched from another base (its base tensors' sha256 differs from "
                         "the model being patched): distil from a checkpoint patched from the same base")
    model, _ = load_onto(path, patched.base_copy().net)
    return model, {"file": path.name, "sha256": sha256_file(path)}


def _check_teacher_output(model: torch.nn.Module, ds: hdata.Dataset, n_classes: int | None, device: torch.device,
                          what: str) -> None:
    """The teacher runs on two images of `ds` and gives logits of `n_classes` classes."""
    x = ds.batch(slice(0, 2))[0].to(device)
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError, KeyError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"{what} fails on inputs of shape {tuple(x.shape[1:])} (C,H,W): {first}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise InputError(f"{what} must return logits of shape (batch, classes), got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if n_classes is not None and out.shape[1] != n_classes:
        raise InputError(f"{what} gives {out.shape[1]} classes but the model being patched has {n_classes}: "
                         "distil from a model of the same classes")


def method_options(opts: PatchOptions) -> dict:
    """The options training methods own (their configs' declarations), from `opts`, as `FitConfig` takes them: by
    field name where it has that field, else in its `options` (by option name; only those off their default, so
    the record of a run that leaves them names none)."""
    fit_fields = {f.name for f in fields(F.FitConfig)}
    out: dict = {"options": {}}
    for cls in dict.fromkeys(m.config_cls for m in M.REGISTRY.values()):
        for field_name, name, spec in optspec.declared(cls):
            v = getattr(opts, name)
            if field_name in fit_fields:
                out[field_name] = v
            elif v != spec.default:
                out["options"][name] = v
    return out


def add_pseudo_labels(patched: PatchedModel, train_ds: hdata.Dataset, pool: hdata.Dataset, opts: PatchOptions,
                      cfg: F.FitConfig, device: torch.device) -> tuple[hdata.Dataset, F.FitConfig, dict]:
    """Robust self-training data (Carmon et al. 2019): the frozen base labels `pool` (clean inputs, eval mode); the
    images it is at least `opts.pseudo_threshold` confident on join the training set after the labelled ones, and each
    epoch trains on every labelled image plus `pseudo_ratio` times as many pseudo-labelled ones, in turn. Returns the
    training set, the trainer's configuration and the record (how many were kept; where `pool` has labels of its
    own, how often the base's labels agree with them)."""
    from dataclasses import replace

    if len(pool) == 0:
        raise InputError("--unlabeled: no images to pseudo-label")
    if tuple(pool.shape) != tuple(train_ds.shape):
        raise InputError(f"--unlabeled images are {tuple(pool.shape)} but the training images are "
                         f"{tuple(train_ds.shape)} (C,H,W): give images of the model's input size, or --resize")
    base = Disabled(patched).eval()
    preds, confs = [], []
    with torch.no_grad():
        for i in range(0, len(pool), 512):
            x, _ = pool.batch(slice(i, i + 512))
            p = torch.softmax(E.finite_logits(base(x.to(device)).float(), "--unlabeled images"), 1).cpu()
            c, k = p.max(1)
            preds.append(k)
            confs.append(c)
    pred, conf = torch.cat(preds), torch.cat(confs)
    keep = conf >= opts.pseudo_threshold
    if not bool(keep.any()):
        raise InputError(f"--pseudo-threshold {opts.pseudo_threshold}: the base is that confident on none of the "
                         f"{len(pool):,} --unlabeled images; lower it")
    labelled_pool = pool.labels >= 0
    record = {"source": pool.source, "pool": len(pool), "threshold": opts.pseudo_threshold,
              "kept": int(keep.sum()), "ratio": opts.pseudo_ratio,
              "per_epoch": min(int(keep.sum()), max(1, round(opts.pseudo_ratio * len(train_ds))))}
    if bool((keep & labelled_pool).any()):  # the pool's own labels, never used for training: a diagnostic
        m = keep & labelled_pool
        record["agreement_with_pool_labels"] = float((pred[m] == pool.labels[m]).float().mean())
    kept = pool.take(torch.nonzero(keep).flatten())
    xa, xb = train_ds.images, kept.images
    if xa.dtype != xb.dtype:
        xa, xb = hdata.to_float(xa), hdata.to_float(xb)
    combined = hdata.Dataset(torch.cat([xa, xb]), torch.cat([train_ds.labels, pred[keep]]), train_ds.classes,
                             f"{train_ds.source} + {record['kept']:,} pseudo-labelled ({pool.source})",
                             list(train_ds.notes))
    return combined, replace(cfg, labelled=len(train_ds), pseudo_per_epoch=record["per_epoch"]), record


def effective_threat_model(cfg: F.FitConfig) -> str:
    """What the training, as configured (preset and overrides), aims to withstand."""
    if cfg.noise_sigma:
        return "certified"
    return "white-box" if cfg.full or cfg.adaptive else "transfer"


def training_record(cfg: F.FitConfig, spec: A.AttackSpec, logs: list, train_ds: hdata.Dataset, opts: PatchOptions,
                    preset, split: Split, val_ds: hdata.Dataset | None) -> TrainingRecord:
    training = TrainingRecord(**F.record(cfg, spec, logs, train_ds, None if opts.subset is None else str(opts.subset)))
    training.preset = preset.record() if preset else None
    training.threat_model = effective_threat_model(cfg)
    if preset:
        training.preset["overridden"] = sorted(k for k, v in preset.options.items() if getattr(opts, k) != v)
    training.split = split.record
    if val_ds is not None:
        training.validation = {"n": len(val_ds), "fingerprint": val_ds.fingerprint(),
                               "attack": "pgd-10 (white-box, and transfer from the base)",
                               "selected_epoch": F.selected_epoch(logs, cfg)}
    return training
