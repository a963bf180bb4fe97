"""The trainer: one loop for every training method (`hardener.methods`), which it knows by their contract only.

Per step: a batch (augmented with --augment), the base's answers on it (the distillation targets, cached when the
inputs do not change), the second input the method's adversary makes (adversarial examples of the base or of the
model being trained, or noise), a forward of each input on the method's routes, the method's loss (named parts),
one Adam step. State is saved atomically for --resume; a held-out split is validated (and the best epoch kept with
--select-on); the base is checked bit-identical afterwards unless the method trains it.
"""
from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch

from .. import attacks, methods
from .. import data as hdata
from ..errors import InputError, Interrupted, RunError
from ..evaluation.threats import PRECISIONS, Autocast
from ..io.resume import Saver
from ..options import owners
from ..options.choices import ADVERSARY_CHOICES, TWIN_STATS, Adversary
from ..patches import AuxBN, PatchedModel
from ..patches.attach import Disabled
from ..runtime.clock import VAL_UNITS, Clock, fmt_seconds, train_units  # noqa: F401  (re-exported)
from ..runtime.distributed import World
from .cache import BaseCache, SpilledArray, Uncacheable


@dataclass
class FitConfig:
    """The trainer's options (stored in the checkpoint's training record). A method's own options (declared in its
    config dataclass, `hardener.methods`, which checks them) are read from the fields of the same name here (those of
    the built-in methods, kept so that records read as before: their defaults are the declarations'), else from
    `options`, by option name (a method registered from outside, an option added later)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    lam: float = 1.0  # feature distillation weight
    mu: float = 1.0  # logit distillation weight
    gamma: float = 0.0  # focal CE
    adversary: str = Adversary.BASE.value  # base (transfer, the paper) | patched (adaptive): choices.ADVERSARY_CHOICES
    augment: bool = False
    seed: int = 0
    method: str = "patch"
    loss: str = owners.default("loss_name")
    beta: float = owners.default("beta")
    eps_warmup: float = 0.0  # epochs over which eps ramps linearly from 0 (adaptive adversary only)
    select: bool = False  # keep the epoch with the best white-box accuracy on the validation split
    validate_every: int = 1  # validate after every k-th epoch (and the last)
    phi: float = owners.default("phi")
    betas: tuple[float, float, float] = owners.default("betas")
    sigma: float = owners.default("sigma")
    cache: bool = True  # transfer training without augmentation: cache the frozen base's answers
    cache_limit: int = 2 << 30  # bytes of caches kept in memory; the rest spills to disk in fp16
    precision: str = "fp32"  # autocast of the training forwards and attack (bf16, fp16); master weights stay fp32
    labelled: int | None = None  # the first N images of the training set are labelled, the rest pseudo-labelled
    pseudo_per_epoch: int = 0  # pseudo-labelled images per epoch, taken in turn from a seeded order of them
    ema: float = 0.0  # > 0: decay of an exponential moving average of the trained weights (validated and kept)
    twin_stats: str = "batch"  # BN twins in training: batch (each input's own batch statistics), joint (clean and
    # second input in one batch, one forward: normalised as the running statistics will serve both), frozen (the
    # base's running statistics throughout, eval-mode twins: only their affine parameters learn)
    noise_sigma: float = 0.0  # > 0: denoised smoothing -- the second input is x + N(0, σ²), the loss the stability
    # objective CE(f(D(x + δ)), f(x)'s class) (Salman et al. 2020) instead of clean + adversarial CE
    teacher: dict | None = None  # robust distillation (--loss rslad): the teacher's record (its name and sha256);
    # the teacher itself is fit's `teacher` argument
    teacher_weight: float = owners.default("teacher_weight")  # RSLAD's weight of KL(teacher(x) || student(x_adv))
    options: dict = field(default_factory=dict)  # methods' options without a field above, by option name

    def __post_init__(self) -> None:
        if self.adversary not in ADVERSARY_CHOICES:
            raise InputError(f"--adversary must be {' or '.join(ADVERSARY_CHOICES)}, got '{self.adversary}'")
        if self.epochs < 1 or self.batch_size < 1 or self.validate_every < 1:
            raise InputError("--epochs, --batch-size and --validate-every must be at least 1")
        if self.method not in methods.REGISTRY:
            raise InputError(f"unknown training method '{self.method}' (choose from {', '.join(methods.names())})")
        methods.check_options(self)
        if (self.loss == "rslad") != (self.teacher is not None):
            raise InputError("--loss rslad and --teacher go together (RSLAD's targets are the teacher's soft labels)"
                             ": give both or neither")
        if self.teacher is not None and self.noise_sigma > 0:
            raise InputError("--loss rslad does not apply with --noise-sigma (the stability objective of denoised "
                             "smoothing replaces the loss): drop --teacher and --loss rslad, or --noise-sigma")
        if self.teacher is not None and "teacher_weight" not in {f.name for f in fields(
                methods.REGISTRY[self.method].config_cls)}:
            raise InputError(f"--teacher: --method {self.method} does not distil from a teacher (a method whose "
                             "options have teacher_weight does)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--precision must be fp32, bf16 or fp16, got '{self.precision}'")
        if self.labelled is not None and (self.labelled < 1 or self.pseudo_per_epoch < 0):
            raise InputError("pseudo-labelled training needs at least one labelled image")
        if not 0.0 <= self.ema < 1.0:
            raise InputError(f"--ema must be at least 0 (off) and below 1, got {self.ema}")
        if self.twin_stats not in TWIN_STATS:
            raise InputError(f"--twin-stats must be {', '.join(TWIN_STATS)}, got '{self.twin_stats}'")
        if self.twin_stats == "joint" and methods.get(self.method).dual_bn:
            raise InputError(f"--twin-stats joint: --method {self.method} sends clean inputs through the base's BNs "
                             "and adversarial ones through the twins; there is no batch to share (use batch or frozen)")
        if self.eps_warmup < 0 or self.eps_warmup > self.epochs:
            raise InputError(f"--eps-warmup must be between 0 and --epochs ({self.epochs}), got {self.eps_warmup}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def epoch_images(self, n: int) -> int:
        """Images one epoch trains on, of a training set of `n`: all, or with pseudo-labelled images every labelled
        one plus `pseudo_per_epoch` of the others."""
        return n if self.labelled is None else self.labelled + min(self.pseudo_per_epoch, n - self.labelled)

    @property
    def full(self) -> bool:
        """Every base weight trains (the result is not a patch)."""
        return methods.get(self.method).trains_base

    @property
    def adaptive(self) -> bool:
        """Adversarial examples regenerated against the model being trained, every step."""
        return methods.build(self).adversary() == Adversary.PATCHED

    @property
    def cached_adversarials(self) -> bool:
        """Adversarial examples of the original model, made once for the whole subset."""
        kind = methods.build(self).adversary()
        return kind == Adversary.ONCE or (kind == Adversary.BASE and not self.augment)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    ce_clean: float
    ce_adv: float
    distill: float
    acc_clean: float
    acc_adv: float
    seconds: float
    val_clean: float | None = None
    val_robust: float | None = None  # white-box PGD-10 on the model being trained
    val_transfer: float | None = None  # PGD-10 computed on the (original) base, scored on the model
    val_seconds: float | None = None
    fallback: str | None = None  # catastrophic overfitting seen after this epoch: what training switched to


# progress(phase, done, total, info): `info` holds figures to show beside the bar; with "line", a finished sentence
# to print as is (the per-epoch validation line)
Progress = Callable[[str, int, int, dict], None]
PARTS = ("loss", "ce_clean", "ce_adv", "distill")  # the loss parts every epoch logs


def warmup_cosine(total: int, warmup_frac: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over the first steps, then cosine decay to zero."""
    warm = max(1, int(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return factor


def _base_adversarials(source: torch.nn.Module, ds: hdata.Dataset, spec: attacks.AttackSpec, batch_size: int,
                       device: torch.device, progress: Progress | None,
                       stop: Callable[[], bool] = lambda: False, out=None):
    """Adversarial examples of the frozen base for the whole set, computed once (transfer setting), into `out`
    (an fp32 tensor by default, or a `SpilledArray`). None when `stop()` turned true on the way."""
    attack = attacks.build(source, spec)
    out = torch.empty(ds.images.shape, dtype=torch.float32) if out is None else out
    n = len(ds)
    for i in range(0, n, batch_size):
        x, y = ds.batch(slice(i, i + batch_size))
        x, y = x.to(device), y.to(device)
        out[i:i + batch_size] = attacks.project(x, attack(x, y), spec.eps, spec.norm).cpu()
        if progress:
            progress("attack", min(i + batch_size, n), n, {})
        if stop():
            return None
    return out


def _spilled_adversarials(teacher, ds: hdata.Dataset, spec: attacks.AttackSpec, cfg: FitConfig,
                          device: torch.device, progress: Progress | None, stop: Callable[[], bool],
                          saver: Saver | None, cache_dir):
    """The base's adversarial examples in fp16 on disk: beside the output (`<out>.partial.adv.npy`, kept for
    --resume) with a saver, else in a temporary folder removed after training. Returns (array, temp folder)."""
    import tempfile
    from pathlib import Path


    if saver is not None and not saver.readonly:
        if saver.resume and saver.spill_done():
            return SpilledArray(saver.spill_path), None
        arr, tmp = SpilledArray(saver.spill_path, tuple(ds.images.shape)), None
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".harden-adv-", dir=str(cache_dir) if cache_dir else None))
        arr = SpilledArray(tmp / "adv.npy", tuple(ds.images.shape))
    if _base_adversarials(teacher, ds, spec, cfg.batch_size, device, progress, stop, out=arr) is None:
        raise Interrupted("interrupted before training started; nothing to resume")
    arr.flush()
    if saver is not None:
        saver.mark_spill_done()
    return arr, tmp


class _Validation:
    """Accuracy on a held-out split after every epoch: clean, white-box PGD-10 (random start) on the model
    being trained, and transfer (the same attack computed once on the original base). With `amp` (the training's
    --precision), the attacks run under autocast as the training attack does; examples are scored in fp32."""

    def __init__(self, ds: hdata.Dataset, spec: attacks.AttackSpec, batch_size: int, device: torch.device,
                 base: torch.nn.Module, amp: torch.dtype | None = None) -> None:
        self.x, self.y = hdata.to_float(ds.images), ds.labels
        self.spec = replace(spec, name="pgd", steps=10, alpha=None, smooth_grad=None, radius=1.0, settings={})
        self.batch_size, self.device, self.amp = batch_size, device, amp
        self.transfer_x = self._attack(base)

    def _batches(self):
        for i in range(0, len(self.y), self.batch_size):
            yield slice(i, i + self.batch_size)

    def _attack(self, model: torch.nn.Module) -> torch.Tensor:
        attack = attacks.build(Autocast(model, self.amp) if self.amp is not None else model, self.spec)
        out = torch.empty_like(self.x)
        for sl in self._batches():
            x, y = self.x[sl].to(self.device), self.y[sl].to(self.device)
            out[sl] = attacks.project(x, attack(x, y), self.spec.eps, self.spec.norm).cpu()
        return out

    @torch.no_grad()
    def _accuracy(self, model: torch.nn.Module, x: torch.Tensor) -> float:
        hits = sum(int((model(x[sl].to(self.device)).argmax(1).cpu() == self.y[sl]).sum()) for sl in self._batches())
        return hits / len(self.y)

    def __call__(self, model: PatchedModel) -> tuple[float, float, float]:
        model.eval()
        return (self._accuracy(model, self.x), self._accuracy(model, self._attack(model)),
                self._accuracy(model, self.transfer_x))


def _check_teacher(teacher: torch.nn.Module | None, cfg: FitConfig, method: methods.Method,
                   device: torch.device) -> torch.nn.Module | None:
    """fit's `teacher` against `cfg.teacher` (its record; `FitConfig` checks the method takes a teacher), frozen, in
    eval mode, on `device`."""
    if (teacher is None) != (cfg.teacher is None):
        raise InputError("robust distillation needs both the teacher module (fit's teacher=) and its record "
                         "(FitConfig.teacher), or neither")
    if teacher is None:
        return None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def _trainable(patched: PatchedModel, method: methods.Method) -> list[torch.nn.Parameter]:
    if method.trains_base:
        patched.finetune_base = True
        return list(patched.model.parameters()) + list(patched.patch_parameters())
    return list(patched.patch_parameters())


def _live_state(patched: PatchedModel, full: bool) -> dict[str, torch.Tensor]:
    """The trained tensors themselves (patches; with `full`, the base too), not copies."""
    sd = dict(patched.patch_state_dict())
    if full:
        sd.update({f"base.{k}": v for k, v in patched.base_state_dict().items()})
    return sd


def _state_of(patched: PatchedModel, full: bool) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _live_state(patched, full).items()}


class _Average:
    """An exponential moving average of the trained state (`--ema`; Polyak averaging, as in Gowal et al. 2020 for
    adversarial training): after optimiser step t it moves towards the weights by 1 - d_t, with
    d_t = min(decay, (1 + t) / (10 + t)), so that the first, random weights fade fast. Buffers that are not
    floating point (BN step counts) are copied."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.state: dict[str, torch.Tensor] | None = None  # None until the first step (or a resumed run's)

    @torch.no_grad()
    def update(self, live: dict[str, torch.Tensor], t: int) -> None:
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in live.items()}
            return
        d = min(self.decay, (1 + t) / (10 + t))
        for k, v in live.items():
            a = self.state[k]
            if a.is_floating_point():
                a.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                a.copy_(v)


def _load_state(patched: PatchedModel, sd: dict[str, torch.Tensor], full: bool) -> None:
    patched.load_patch_state_dict({k: v for k, v in sd.items() if k.startswith("harden.")})
    if full:
        patched.net.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("base.")})


def fit(patched: PatchedModel, ds: hdata.Dataset, spec: attacks.AttackSpec, cfg: FitConfig,
        device: torch.device, progress: Progress | None = None, saver: Saver | None = None,
        stop: Callable[[], bool] = lambda: False, val: hdata.Dataset | None = None,
        info: dict | None = None, cache_dir=None,
        on_estimate: Callable[[dict], None] | None = None, world=None,
        teacher: torch.nn.Module | None = None) -> list[EpochLog]:
    """Train `patched` on `ds` by `cfg.method`. With a `saver`, state is saved atomically at the end of
    every epoch (and every `saver.every_steps` steps), and when `stop()` turns true, after which
    `Interrupted` is raised; `saver.resume` continues bit-identically from the saved state. With `val`
    (and `cfg.select`), the epoch with the best white-box validation accuracy is kept. `on_estimate` is called
    once, after the first few timed steps, with the estimated seconds left (`Clock.estimate`). With a `world` of
    several processes (torchrun), each step's batch is split between them and the patch gradients are summed
    across processes (data parallel over the trainable parameters only: the frozen base needs no sync); only rank 0
    writes state (its saver), the others pass a read-only one to resume from. `teacher` (with `cfg.teacher` its
    record and `--loss rslad`): a frozen model taking the same [0, 1] inputs whose logits on each clean batch are the
    soft labels of robust distillation; it is never trained nor saved."""
    trainer = _Trainer(patched, ds, spec, cfg, device, progress, saver, stop, val, world, teacher)
    trainer.prepare(info, cache_dir, on_estimate)
    try:
        return trainer.run()
    finally:
        if info is not None and trainer.oom:
            info["out_of_memory"] = list(trainer.oom)


class _Trainer:
    """One training run: the method, the model's trainable parameters, Adam with a warm-up cosine schedule, the
    run's generator (batch order, augmentation, noise), the position to resume from."""

    def __init__(self, patched: PatchedModel, ds: hdata.Dataset, spec: attacks.AttackSpec, cfg: FitConfig,
                 device: torch.device, progress: Progress | None, saver: Saver | None,
                 stop: Callable[[], bool], val: hdata.Dataset | None, world=None,
                 teacher: torch.nn.Module | None = None) -> None:
        self.world = world or World()
        self.method = method = methods.build(cfg)
        self.soft_teacher = _check_teacher(teacher, cfg, method, device)
        if method.auxbn == "required" and not patched.has_auxbn:
            raise InputError(f"--method {cfg.method} needs auxiliary BNs (--bn all): the model has none attached")
        if cfg.select and val is None:
            raise InputError("--select-on needs a validation split")  # (the CLI always gives one)
        self.val = val
        self.patched, self.ds, self.spec, self.cfg, self.device = patched, ds, spec, cfg, device
        self.progress, self.saver, self.stop = progress, saver, stop
        self.full = method.trains_base
        self.teacher = patched.base_copy() if self.full else Disabled(patched)
        self.params = _trainable(patched, method)
        if not self.params:
            raise InputError("nothing to train: no patch parameters")
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.epoch_size = cfg.epoch_images(len(ds))
        self.steps_per_epoch = math.ceil(self.epoch_size / cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(cfg.epochs * self.steps_per_epoch))
        self.base_before = {k: v.detach().clone() for k, v in patched.base_state_dict().items()}
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.logs: list[EpochLog] = []
        self.start_epoch, self.start_step, self.perm, self.sums, self.best = 0, 0, None, None, None
        self.average = _Average(cfg.ema) if cfg.ema else None
        if saver is not None and saver.resume:
            self._resume(saver.load())
        self.cached_adv, self.base_cache, self.spill_dir = None, None, None
        self.adversary = method.adversary()

        self.amp = PRECISIONS[cfg.precision]  # None for fp32
        fp16 = self.amp is torch.float16 and device.type == "cuda"
        scaler = getattr(torch.amp, "GradScaler", None)  # torch >= 2.3; torch.cuda.amp's before
        self.scaler = scaler(device.type, enabled=fp16) if scaler else torch.cuda.amp.GradScaler(enabled=fp16)
        self.micro = 1  # each process's share of a batch runs in this many pieces (doubled on out of memory)
        self.oom: list[dict] = []  # what out-of-memory splits happened (recorded in the report)

    def _resume(self, st: dict) -> None:
        _load_state(self.patched, st["model"], self.full)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        r = self.world.rank
        self.g.set_state(st["generators"][r] if "generators" in st else st["generator"])
        torch.set_rng_state(st["torch_rngs"][r] if "torch_rngs" in st else st["torch_rng"])
        self.logs = [EpochLog(**e) for e in st["logs"]]
        self.start_epoch, self.start_step, self.perm, self.best = st["epoch"], st["step"], st["perm"], st["best"]
        self.sums = st["sums_per_rank"][r] if "sums_per_rank" in st else st["sums"]
        if self.average is not None:
            self.average.state = st.get("ema")
        if any(e.fallback for e in self.logs):  # catastrophic overfitting was seen before the interruption
            self.spec = self._fallback_spec()

    def save(self, epoch: int, step: int) -> None:
        if self.saver is None:
            return
        mine = {"generator": self.g.get_state(), "torch_rng": torch.get_rng_state(), "sums": self.sums}
        if self.world.active:  # every process's random streams and partial sums, so that each goes on as it would
            from ..runtime.distributed import gather

            every = gather(mine, self.world)
            if not self.world.main:
                return
            mine.update(generators=[e["generator"] for e in every], torch_rngs=[e["torch_rng"] for e in every],
                        sums_per_rank=[e["sums"] for e in every])
        self.saver.save({"model": _state_of(self.patched, self.full), "optimizer": self.opt.state_dict(),
                         "scheduler": self.sched.state_dict(), **mine, "logs": [asdict(e) for e in self.logs],
                         "epoch": epoch, "step": step, "perm": self.perm, "best": self.best,
                         "ema": self.average.state if self.average is not None else None})

    # -- before the first step
    def _adversarials_once(self) -> int:
        """The base's adversarial examples for the whole set, when the method's adversary allows making them once
        (in memory, or spilled to disk in fp16 beyond --cache-limit). Returns the bytes they take in memory."""
        cfg, ds, saver = self.cfg, self.ds, self.saver
        if not (self.adversary == Adversary.ONCE or (self.adversary == Adversary.BASE and not cfg.augment)):
            return 0
        if cfg.augment:
            raise InputError(f"--method {cfg.method} makes its adversarial examples once (stage 1): drop --augment")
        adv_bytes = len(ds) * int(ds.images[0].numel()) * 4
        if adv_bytes > cfg.cache_limit:  # too large for memory: fp16 on disk, which is also what a resumed run reads
            self.cached_adv, self.spill_dir = _spilled_adversarials(self.teacher, ds, self.spec, cfg, self.device,
                                                                    self.progress, self.stop, saver, self.cache_dir)
            return 0
        self.cached_adv = saver.load_adv() if saver is not None else None
        if self.cached_adv is None:
            self.cached_adv = _base_adversarials(self.teacher, ds, self.spec, cfg.batch_size, self.device,
                                                 self.progress, self.stop)
            if self.cached_adv is None:  # stopped while attacking: nothing worth keeping yet
                raise Interrupted("interrupted before training started; nothing to resume")
            if saver is not None:
                saver.save_adv(self.cached_adv)
        return adv_bytes

    def prepare(self, info: dict | None, cache_dir, on_estimate: Callable[[dict], None] | None) -> None:
        """Before the first step: the adversarial examples made once, the base's cached answers, the method's own
        preparation, the validation split's transfer examples, the clock."""
        cfg, spec, val = self.cfg, self.spec, self.val
        self.cache_dir = cache_dir
        adv_bytes = self._adversarials_once()
        if self.cached_adv is not None and not self.full:
            t_cache = time.time()
            try:
                self.base_cache = BaseCache(self.patched, self.ds, self.cached_adv,
                                            replace(cfg, cache_limit=max(0, cfg.cache_limit - adv_bytes)),
                                            self.device, cache_dir, self.progress)
            except Uncacheable as e:  # the base's answers are computed every step instead
                if info is not None:
                    info["cache"] = f"the base's answers cannot be cached ({e}): training runs uncached"
            if info is not None and self.base_cache is not None:
                info.update(cache=self.base_cache.note, cache_seconds=time.time() - t_cache,
                            cache_bytes_in_memory=self.base_cache.store.used,
                            cache_spilled=list(self.base_cache.store.spilled))
        self.method.prepare(self)
        self.validate = (_Validation(val, spec, max(cfg.batch_size, 256), self.device, self.teacher, self.amp)
                         if val is not None else None)
        total_steps = cfg.epochs * self.steps_per_epoch
        n_vals = sum(1 for e in range(self.start_epoch, cfg.epochs)
                     if (e + 1) % cfg.validate_every == 0 or e + 1 == cfg.epochs)
        self.clock = Clock(total_steps - (self.start_epoch * self.steps_per_epoch + self.start_step),
                           n_vals if self.validate else 0, cfg.batch_size * train_units(cfg, spec),
                           len(val) * VAL_UNITS if self.validate else 0, on_estimate)

    # -- the loop
    def run(self) -> list[EpochLog]:
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                log = self._epoch(epoch)
                converged = self.method.converged(log.loss)
                self.save(self.cfg.epochs if converged else epoch + 1, 0)
                if converged:
                    break
        except RunError as e:
            saver = self.saver
            if saver is not None and not saver.path.exists():
                saver.clear()  # nothing to resume from: the cached adversarial examples would only be left over
                raise
            if saver is not None:
                raise RunError(f"{e.message}; the last good state is kept in '{saver.path}' (--resume continues "
                               "from it)") from None
            raise
        finally:
            if self.base_cache is not None:
                self.base_cache.store.close()
            if self.spill_dir is not None:
                shutil.rmtree(self.spill_dir, ignore_errors=True)
        return self._finish()

    def _epoch(self, epoch: int) -> EpochLog:
        t0 = time.time()
        if self.perm is None:
            self.sums = dict(loss=0.0, ce_clean=0.0, ce_adv=0.0, distill=0.0, acc_clean=0.0, acc_adv=0.0)
            self.perm = self._epoch_indices(epoch)
            if self.world.active:  # one batch order for every process (their generators drift with augmentation)
                import torch.distributed as dist

                perm = self.perm.to(self.device)
                dist.broadcast(perm, src=0)
                self.perm = perm.cpu()
        for step in range(self.start_step, self.steps_per_epoch):
            self._step(epoch, step)
        assert self.sums is not None
        if self.world.active:  # the epoch's sums over every process's share of the batches
            import torch.distributed as dist

            t = torch.tensor([self.sums[k] for k in sorted(self.sums)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            self.sums = dict(zip(sorted(self.sums), t.cpu().tolist()))
        log = EpochLog(epoch + 1, **{k: v / self.epoch_size for k, v in self.sums.items()}, seconds=time.time() - t0)
        cfg = self.cfg
        if self.validate is not None and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs):
            t_val = time.time()
            n_vals = self.clock.vals + self.clock.vals_left
            if self.progress:  # a phase of its own: the training bar does not sit at its end meanwhile
                self.progress("validation", self.clock.vals, n_vals, {"epoch": epoch + 1})
            with self._averaged():  # what would be kept is what is scored
                log.val_clean, log.val_robust, log.val_transfer = self.validate(self.patched)
                state = _state_of(self.patched, self.full) if cfg.select else None
            log.val_seconds = time.time() - t_val
            self.clock.validated(log.val_seconds)
            fell_back = self._guard(log)  # the weights it scored are gone: they cannot be the kept epoch
            score = (log.val_robust, log.val_clean)
            kept = cfg.select and not fell_back and (self.best is None or score > tuple(self.best["score"]))
            if kept:
                self.best = {"score": list(score), "epoch": epoch + 1, "state": state}
            if self.progress:
                self.progress("validation", self.clock.vals, n_vals, {"line": self._validation_line(log, kept)})
        self.logs.append(log)
        self.perm, self.sums, self.start_step = None, None, 0
        return log

    def _validation_line(self, log: EpochLog, kept: bool) -> str:
        """The epoch's validation, one line: clean, white-box and transfer accuracy, and whether the epoch is kept."""
        if log.fallback:
            verdict = f"not kept: catastrophic overfitting, back to the best epoch and on with {log.fallback}"
        elif not self.cfg.select:
            verdict = "logged (no epoch selection)"
        else:
            best = self.best or {"epoch": "-", "score": [0.0]}
            verdict = "kept (best so far)" if kept else \
                f"not kept (epoch {best['epoch']} stays, white-box {100 * best['score'][0]:.1f}%)"
        return (f"epoch {log.epoch}/{self.cfg.epochs} validation on {len(self.validate.y):,} images: clean "
                f"{100 * log.val_clean:.1f}%, white-box PGD-10 {100 * log.val_robust:.1f}%, transfer "
                f"{100 * log.val_transfer:.1f}% ({log.val_seconds:.0f}s); {verdict}")

    @contextmanager
    def _averaged(self):
        """The averaged weights in the model for the block (with --ema), the trained ones back after it."""
        if self.average is None or self.average.state is None:
            yield
            return
        live = _state_of(self.patched, self.full)
        _load_state(self.patched, self.average.state, self.full)
        try:
            yield
        finally:
            _load_state(self.patched, live, self.full)

    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        """The epoch's images in a shuffled order: all of them; or, with pseudo-labelled images, every labelled
        one and the next `pseudo_per_epoch` pseudo-labelled ones of a seeded order (so each is seen in turn)."""
        n_l = self.cfg.labelled
        if n_l is None:
            return torch.randperm(len(self.ds), generator=self.g)
        n_u = len(self.ds) - n_l
        k = self.epoch_size - n_l
        order = torch.randperm(n_u, generator=torch.Generator().manual_seed(self.cfg.seed + 104729))
        pick = order[(torch.arange(k) + epoch * k) % n_u] + n_l if k else torch.empty(0, dtype=torch.int64)
        idx = torch.cat([torch.arange(n_l), pick])
        return idx[torch.randperm(len(idx), generator=self.g)]

    FALLBACK_STEPS = 5

    def _fallback_spec(self) -> attacks.AttackSpec:
        return replace(self.spec, name="pgd", steps=self.FALLBACK_STEPS, alpha=None, radius=1.0, settings={})

    def _guard(self, log: EpochLog) -> bool:
        """Catastrophic overfitting of a single-step training attack (Wong et al. 2020): the model learns to defeat
        that attack while white-box PGD-10 on the validation split collapses. Seen when validation robust accuracy
        falls below half its best so far (and by more than 10 points), or below half the training accuracy under the
        single-step attack (and by more than 20 points): the best epoch's patches come back and the remaining epochs
        train with PGD-5 (recorded in the epoch log)."""
        if attacks.info(self.spec.name).kind != "single-step" or log.val_robust is None:
            return False
        best = max((e.val_robust for e in self.logs if e.val_robust is not None), default=None)
        v, a = log.val_robust, log.acc_adv
        fell = best is not None and v < 0.5 * best and best - v > 0.1
        behind = v < 0.5 * a and a - v > 0.2  # absolute margins: early epochs are low and noisy
        if not (fell or behind):
            return False
        if self.best is not None:
            _load_state(self.patched, self.best["state"], self.full)
        self.spec = self._fallback_spec()
        log.fallback = f"pgd-{self.FALLBACK_STEPS}"
        return True

    def _targets(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation targets: the (original) base on the clean input, logits and features at each site."""
        patched = self.patched
        if self.base_cache is not None:
            return self.base_cache.targets(idx, self.device)
        with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
            base_logits = self.teacher(x) if self.full else patched(x)
        return base_logits, ({s: feats[s].detach() for s in patched.sites} if not self.full else {})

    def _second_input(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, done: int) -> torch.Tensor:
        """The method's adversary on this batch: eps ramps up over --eps-warmup epochs; a fresh seed per step."""
        cfg, spec = self.cfg, self.spec
        ramp = min(1.0, (done + 1) / (cfg.eps_warmup * self.steps_per_epoch)) if cfg.eps_warmup else 1.0
        step_spec = replace(spec, eps=spec.eps * ramp, seed=spec.seed + 7919 * (done + 1), settings={})
        if self.adversary == Adversary.NOISE:  # Gaussian noise from the run's generator (saved with the state)
            return x + cfg.noise_sigma * torch.randn(x.shape, generator=self.g).to(self.device)
        if self.cached_adv is not None:
            return self.cached_adv[idx].to(self.device)

        if self.adversary != Adversary.PATCHED:
            source = Autocast(self.teacher, self.amp) if self.amp is not None else self.teacher
            return attacks.project(x, attacks.build(source, step_spec)(x, y), step_spec.eps * spec.radius, spec.norm)
        self.patched.eval()
        target = Autocast(self.patched, self.amp) if self.amp is not None else self.patched
        with self.patched.route("adv"):
            return attacks.project(x, attacks.build(target, step_spec)(x, y), step_spec.eps * spec.radius, spec.norm)

    def _train_mode(self) -> None:
        """Training mode; with --twin-stats frozen the BN twins stay in eval mode, normalising with their running
        statistics (the base's, never updated), so that only their affine parameters learn."""
        self.patched.train()
        if self.cfg.twin_stats == "frozen":
            for p in self.patched.patches.values():
                if isinstance(p, AuxBN):
                    p.twin.eval()

    def _forward(self, x: torch.Tensor, which: str, route: str, idx: torch.Tensor):
        """Logits and the features after each patch of one input on `route` (fed the cached prefix if any)."""
        feed = self.base_cache.feeding(which, idx, self.device) if self.base_cache is not None else nullcontext()
        cast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with self.patched.route(route), self.patched.capture() as feats, feed, cast:
            out = self.patched(x)
        return out.float(), feats

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The robust teacher on the clean (augmented) input: RSLAD's soft labels, without gradients."""
        if self.soft_teacher is None:
            return None
        cast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with torch.no_grad(), cast:
            return self.soft_teacher(x).float()

    def _batch(self, idx: torch.Tensor, done: int) -> methods.Batch:
        x, y = self.ds.batch(idx)
        if self.cfg.augment:
            x = hdata.augment(x, self.g)
        x, y = x.to(self.device), y.to(self.device)
        base_logits, targets = self._targets(x, idx)
        teacher_logits = self._teacher_logits(x)
        x_adv = self._second_input(x, y, idx, done)
        self._train_mode()
        clean_route, adv_route = self.method.routes
        if self.cfg.twin_stats == "joint":  # one forward of both: the twins' batch statistics are of both
            out, feats = self._forward(torch.cat([x, x_adv]), "joint", adv_route, idx)
            # halves, not len(x) rows: a layer may see the batch flattened with its tokens (LeViT's (B·N, C) BN1d)
            out_clean, out_adv = out.chunk(2)
            halves = {s: f.chunk(2) for s, f in feats.items()}
            f_clean, f_adv = {s: h[0] for s, h in halves.items()}, {s: h[1] for s, h in halves.items()}
        else:
            out_clean, f_clean = self._forward(x, "clean", clean_route, idx)
            out_adv, f_adv = self._forward(x_adv, "adv", adv_route, idx)
        return methods.Batch(self.patched, x, y, x_adv, out_clean, out_adv, f_clean, f_adv, base_logits, targets,
                             teacher_logits)

    def _step(self, epoch: int, step: int) -> None:
        cfg, spe, w = self.cfg, self.steps_per_epoch, self.world
        done = epoch * spe + step
        idx = self.perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        share = idx.tensor_split(w.size)[w.rank] if w.active else idx
        while True:
            try:
                values, counts, loss = self._accumulate(share, len(idx), done)
                break
            except torch.OutOfMemoryError:
                self._split_on_oom(len(share), epoch, step)
        if not self._finite_agreed(loss):
            shown = loss if loss is not None and not math.isfinite(loss) else "not finite (another process)"
            raise RunError(f"loss became {shown} at epoch {epoch + 1}, step {step + 1}: lower --lr or check the data")
        if w.active:
            self._all_reduce_grads()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.average is not None:
            self.average.update(_live_state(self.patched, self.full), done + 1)
        self.clock.step()
        for k, v in values.items():
            self.sums[k] += v
        self.sums["acc_clean"] += counts[0]
        self.sums["acc_adv"] += counts[1]
        values = {k: v / max(1, len(share)) for k, v in values.items()}
        if self.progress:
            self.progress("train", done + 1, cfg.epochs * spe,
                          {"epoch": epoch + 1, "loss": values["loss"], "ce": values["ce_clean"],
                           "ce_adv": values["ce_adv"], "distill": values["distill"], "eta": self.clock.eta_text()})
        if self._stop_agreed():
            self.save(epoch, step + 1)
            saver = self.saver
            where = f"'{saver.path}'; rerun with --resume" if saver is not None else "nowhere (no state file)"
            raise Interrupted(f"interrupted at epoch {epoch + 1}, step {step + 1}: state saved to {where}")
        if self.saver is not None and self.saver.every_steps and (done + 1) % self.saver.every_steps == 0:
            self.save(epoch, step + 1)

    def _accumulate(self, share: torch.Tensor, n_batch: int, done: int):
        """Forward and backward of this process's share of a batch, in `self.micro` pieces whose losses are weighted
        by their size (the gradient of the batch's mean loss). Returns the loss parts summed over the samples, the
        clean and adversarial hits, and the mean loss (None for an empty share)."""
        self.opt.zero_grad(set_to_none=True)
        values, hits, total = {k: 0.0 for k in PARTS}, [0.0, 0.0], None
        pieces = [p for p in share.tensor_split(min(self.micro, max(1, len(share)))) if len(p)] if len(share) else []
        for piece in pieces:
            b = self._batch(piece, done)
            parts = self.method.loss(b)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                return values, hits, float(loss.item())
            self.scaler.scale(loss * (len(piece) / n_batch)).backward()
            for k in PARTS:
                values[k] += float(parts[k].item()) * len(piece) if k in parts else 0.0
            hits[0] += float((b.out_clean.argmax(1) == b.y).sum())
            hits[1] += float((b.out_adv.argmax(1) == b.y).sum())
            total = (total or 0.0) + float(loss.item()) * len(piece)
        return values, hits, None if total is None else total / len(share)

    def _split_on_oom(self, n: int, epoch: int, step: int) -> None:
        """Out of memory: run each share in twice as many pieces (the same batch, gradients accumulated), down to
        one image per piece, then fail (exit 3) with what to do."""
        import sys

        if self.micro >= n:
            raise RunError(f"out of memory at epoch {epoch + 1}, step {step + 1} even one image at a time: use a "
                           "smaller model input, another device (--device), or free memory")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.micro *= 2
        print(f"warning: out of memory in training at batch {n}: going on in {self.micro} pieces of "
              f"{-(-n // self.micro)} (gradients accumulated, same batch)", file=sys.stderr)
        self.oom.append({"where": "training", "epoch": epoch + 1, "step": step + 1, "pieces": self.micro})

    def _all_reduce_grads(self) -> None:
        """Sum the trainable parameters' gradients over the processes (each scaled its loss by its share of the
        batch, so the sum is the gradient of the whole batch's mean loss)."""
        import torch.distributed as dist

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def _finite_agreed(self, loss: float | None) -> bool:
        ok = loss is None or math.isfinite(loss)
        if not self.world.active:
            return ok
        import torch.distributed as dist

        t = torch.tensor([int(not ok)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return not bool(t.item())

    def _stop_agreed(self) -> bool:
        """Stop when any process was asked to (every process must stop at the same step)."""
        flag = bool(self.stop())
        if not self.world.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _finish(self) -> list[EpochLog]:
        """The kept epoch's state, the model back in eval with nothing trainable; the base checked unchanged."""
        patched = self.patched
        if self.best is not None:
            _load_state(patched, self.best["state"], self.full)
        elif self.average is not None and self.average.state is not None:
            _load_state(patched, self.average.state, self.full)
        patched.eval()
        for p in self.params:
            p.requires_grad_(False)
        patched.finetune_base = False
        patched.train(False)
        if not self.full:
            for k, v in patched.base_state_dict().items():
                if not torch.equal(v, self.base_before[k]):
                    raise RunError(f"internal error: base tensor '{k}' changed during training; nothing was written")
        return self.logs


def selected_epoch(logs: list[EpochLog], cfg: FitConfig) -> int | None:
    """The epoch kept by --select-on (best white-box validation accuracy, then clean), else None."""
    scored = [(e.val_robust, e.val_clean, -e.epoch) for e in logs if e.val_robust is not None]
    return -max(scored)[2] if cfg.select and scored else None


def config_record(cfg: FitConfig) -> dict:
    """The configuration as the record stores it: the fields, and the `options` beside them (none: as before); the
    teacher's fields only where there is a teacher, and `twin_stats` only where it is not the default "batch" (a run
    without them records, and resumes from, what it recorded before they existed)."""
    out = asdict(cfg)
    extra = out.pop("options")
    if cfg.teacher is None:
        del out["teacher"], out["teacher_weight"]
    if cfg.twin_stats == "batch":
        del out["twin_stats"]
    return {**out, **extra}


def record(cfg: FitConfig, spec: attacks.AttackSpec, logs: list[EpochLog], ds: hdata.Dataset,
           subset: str | None) -> dict:
    """The training record stored in the manifest: no wall times, so equal runs give equal files. A distilled run
    (--teacher) names its teacher under "teacher" (file name and sha256)."""
    import torchattacks

    epochs = [{k: v for k, v in asdict(e).items() if k not in ("seconds", "val_seconds")} for e in logs]
    out = {"config": config_record(cfg), "attack": spec.record(), "epochs": epochs, "seed": cfg.seed,
           "data": {"source": ds.source, "fingerprint": ds.fingerprint(), "n": len(ds), "subset": subset},
           "torch": torch.__version__, "torchattacks": torchattacks.__version__}
    if cfg.teacher is not None:
        out["teacher"] = dict(cfg.teacher)
    return out
