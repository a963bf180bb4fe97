"""Training loops: patches on a frozen base (fixer paper §3.2), and the full fine-tuning methods.

`method="patch"` (fixers, denoise blocks, pre-filters, auxiliary BNs): only patch parameters get
gradients. `loss="fixer"` per batch: CE on the clean and the adversarial input, plus λ · feature
distillation (MSE, element mean, between the features after each patch and the *base's features of
the clean input* at that site — for the clean and the adversarial input alike: the paper's text
says adversarial features are brought back to natural ones), plus optionally μ · KL to the base
logits on the clean input. `loss="trades"` replaces the adversarial CE by β · KL(clean ‖ adversarial)
(Zhang et al. 2019). Auxiliary BNs are trained on route `adv` with every input: at inference
nothing knows which inputs are adversarial.

Full fine-tuning (every base weight changes; the result is not a patch):
  adv-train  CE (or TRADES) on clean + adversarial pairs, adversary = the model being trained;
  advprop    clean batch through the main BNs, its adversarial counterpart (made through the
             auxiliary BNs) through the twins; loss CE_clean + CE_adv (Xie thesis, Algorithm 2);
  advamd     adversarials made once on the original model; mediate samples x + φ·δ and clean
             ones through the main BNs, adversarial ones through the twins; loss
             β1·CE_clean + β2·CE_mediate + β3·Ā_y·CE_adv; stops when the epoch loss falls below σ
             (AdvAmd, Algorithm 1, with labels where its listing writes the model output).
"""
from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from . import attacks, data as hdata, losses
from .errors import InputError, Interrupted, RunError
from .patches import PatchedModel
from .patches.attach import Disabled
from .resume import Saver


@dataclass(frozen=True)
class Method:
    """How a training method routes and makes its adversarial examples."""

    full: bool  # fine-tunes every base weight (the result is not a patch)
    dual_bn: bool  # clean inputs through the main BNs, adversarial ones through the auxiliary twins
    stage1: bool  # adversarial examples made once, on the original model (AdvAmd stage 1)
    adaptive: bool | None  # adversary = the model being trained; None: as --adversary says
    amend: bool = False  # AdvAmd loss: mediate samples and vulnerability-weighted adversarial CE; stops at σ


METHOD_REGISTRY = {
    "patch": Method(full=False, dual_bn=False, stage1=False, adaptive=None),
    "adv-train": Method(full=True, dual_bn=False, stage1=False, adaptive=True),
    "advprop": Method(full=True, dual_bn=True, stage1=False, adaptive=True),
    "advamd": Method(full=True, dual_bn=True, stage1=True, adaptive=False, amend=True),
}
METHODS = tuple(METHOD_REGISTRY)
FULL_METHODS = tuple(m for m, spec in METHOD_REGISTRY.items() if spec.full)


def _adv_ce(out_adv: torch.Tensor, out_clean: torch.Tensor, y: torch.Tensor, cfg: "FitConfig") -> torch.Tensor:
    return losses.focal_ce(out_adv, y, cfg.gamma)


def _adv_trades(out_adv: torch.Tensor, out_clean: torch.Tensor, y: torch.Tensor, cfg: "FitConfig") -> torch.Tensor:
    return cfg.beta * losses.trades_kl(out_adv, out_clean)


ADV_LOSSES = {"fixer": _adv_ce, "trades": _adv_trades}  # the adversarial term of the loss, by --loss
LOSSES = tuple(ADV_LOSSES)


@dataclass
class FitConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    lam: float = 1.0  # feature distillation weight
    mu: float = 1.0  # logit distillation weight
    gamma: float = 0.0  # focal CE
    adversary: str = "base"  # base (transfer, the paper) | patched (adaptive)
    augment: bool = False
    seed: int = 0
    method: str = "patch"
    loss: str = "fixer"
    beta: float = 6.0  # TRADES weight of KL(clean || adversarial)
    eps_warmup: float = 0.0  # epochs over which eps ramps linearly from 0 (adaptive adversary only)
    select: bool = False  # keep the epoch with the best white-box accuracy on the validation split
    validate_every: int = 1  # validate after every k-th epoch (and the last)
    phi: float = 0.5  # AdvAmd mediate coefficient
    betas: tuple[float, float, float] = (1.0, 1.0, 1.0)  # AdvAmd β1..β3
    sigma: float = 0.0  # AdvAmd: stop once the epoch's mean loss is below σ
    cache: bool = True  # transfer training without augmentation: cache the frozen base's answers
    cache_limit: int = 2 << 30  # bytes of caches kept in memory; the rest spills to disk in fp16
    noise_sigma: float = 0.0  # > 0: denoised smoothing -- the second input is x + N(0, σ²), the loss the stability
    # objective CE(f(D(x + δ)), f(x)'s class) (Salman et al. 2020) instead of clean + adversarial CE

    def __post_init__(self) -> None:
        if self.adversary not in ("base", "patched"):
            raise InputError(f"--adversary must be base or patched, got '{self.adversary}'")
        if self.epochs < 1 or self.batch_size < 1 or self.validate_every < 1:
            raise InputError("--epochs, --batch-size and --validate-every must be at least 1")
        if self.method not in METHODS:
            raise InputError(f"unknown training method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.loss not in LOSSES:
            raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if not 0 < self.phi < 1:
            raise InputError(f"--phi must be in (0, 1), got {self.phi}")
        if self.eps_warmup < 0 or self.eps_warmup > self.epochs:
            raise InputError(f"--eps-warmup must be between 0 and --epochs ({self.epochs}), got {self.eps_warmup}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    @property
    def spec(self) -> Method:
        return METHOD_REGISTRY[self.method]

    @property
    def full(self) -> bool:
        return self.spec.full

    @property
    def adaptive(self) -> bool:
        """Adversarial examples regenerated against the model being trained, every step."""
        return self.spec.adaptive if self.spec.adaptive is not None else self.adversary == "patched"

    @property
    def cached_adversarials(self) -> bool:
        """Adversarial examples of the original model, made once for the whole subset."""
        return not self.noise_sigma and (self.spec.stage1 or (not self.adaptive and not self.augment))


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


Progress = Callable[[str, int, int, dict], None]


# Cost units of the time estimate: one forward pass of one image. A backward pass costs about two.
VAL_UNITS = 3 * 10 + 3  # validation per image: PGD-10 on the patched model, three forward passes (clean, wb, tr)


def train_units(cfg: "FitConfig", spec: attacks.AttackSpec) -> float:
    """Forward-pass equivalents per image of one optimiser step: the attack when it runs every step, the clean
    and adversarial passes with their backward, and the base's targets."""
    attack = 3 * int(spec.steps or 1) if not (cfg.cached_adversarials or cfg.noise_sigma) else 0
    return attack + 2 * 3 + 1


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Clock:
    """Time estimates of a training run: seconds per step measured from the first steps (the very first one,
    which pays for allocation, is not counted), validation measured once it has run (estimated from the same
    unit cost before). `on_estimate` gets the first estimate once `TIMED` steps are measured."""

    TIMED = 3

    def __init__(self, steps_left: int, vals_left: int, step_units: float, val_units: float,
                 on_estimate: Callable[[dict], None] | None = None) -> None:
        self.steps_left, self.vals_left = steps_left, vals_left
        self.step_units, self.val_units = step_units, val_units
        self.on_estimate = on_estimate
        self.skip = 1 if steps_left > self.TIMED + 1 else 0
        self.steps, self.step_seconds, self.val_seconds, self.vals = 0, 0.0, 0.0, 0
        self._last = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        if self.steps >= self.skip:
            self.step_seconds += now - self._last
        self.steps += 1
        self.steps_left -= 1
        self._last = now
        if self.on_estimate is not None and (self._timed() >= self.TIMED or self.steps_left == 0) and self._timed():
            self.on_estimate(self.estimate())
            self.on_estimate = None

    def _timed(self) -> int:
        return max(0, self.steps - self.skip)

    def validated(self, seconds: float) -> None:
        self.val_seconds += seconds
        self.vals += 1
        self.vals_left -= 1
        self._last = time.perf_counter()

    @property
    def per_step(self) -> float:
        return self.step_seconds / max(1, self._timed())

    @property
    def unit_seconds(self) -> float:
        """Seconds of one forward pass of one image, as measured by the training steps."""
        return self.per_step / max(1e-9, self.step_units)

    def estimate(self) -> dict:
        per_val = self.val_seconds / self.vals if self.vals else self.unit_seconds * self.val_units
        train, val = self.steps_left * self.per_step, self.vals_left * per_val
        return {"train_seconds": train, "validation_seconds": val, "seconds": train + val,
                "seconds_per_step": self.per_step, "unit_seconds": self.unit_seconds, "timed_steps": self._timed()}

    def eta_text(self) -> str:
        return fmt_seconds(self.estimate()["seconds"]) if self._timed() else "?"


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

    from .cache import SpilledArray

    if saver is not None:
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


def vulnerability(ds: hdata.Dataset, adv: torch.Tensor, source: torch.nn.Module, n_classes: int,
                  batch_size: int, device: torch.device) -> torch.Tensor:
    """AdvAmd's per-class vulnerability coefficient Ā (eq. 6) from the stage-1 attack outcomes.

    α_k^i, the difficulty of turning class k into class i, is 1 − C[k, i], where C[k, i] is the
    fraction of the class-k samples whose adversarial example the original model assigns to i.
    """
    from .evaluation import predict

    pred = predict(source, adv, batch_size, device).argmax(1)
    return losses.vulnerability_from_confusion(losses.confusion(ds.labels, pred, n_classes))


class _Validation:
    """Accuracy on a held-out split after every epoch: clean, white-box PGD-10 (random start) on the model
    being trained, and transfer (the same attack computed once on the original base)."""

    def __init__(self, ds: hdata.Dataset, spec: attacks.AttackSpec, batch_size: int, device: torch.device,
                 base: torch.nn.Module) -> None:
        self.x, self.y = hdata.to_float(ds.images), ds.labels
        self.spec = replace(spec, name="pgd", steps=10, alpha=None, smooth_grad=None, settings={})
        self.batch_size, self.device = batch_size, device
        self.transfer_x = self._attack(base)

    def _batches(self):
        for i in range(0, len(self.y), self.batch_size):
            yield slice(i, i + self.batch_size)

    def _attack(self, model: torch.nn.Module) -> torch.Tensor:
        attack = attacks.build(model, self.spec)
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


def _trainable(patched: PatchedModel, cfg: FitConfig) -> list[torch.nn.Parameter]:
    if cfg.full:
        patched.finetune_base = True
        return list(patched.model.parameters()) + list(patched.patch_parameters())
    return list(patched.patch_parameters())


def _state_of(patched: PatchedModel, cfg: FitConfig) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in patched.patch_state_dict().items()}
    if cfg.full:
        sd.update({f"base.{k}": v.detach().clone() for k, v in patched.base_state_dict().items()})
    return sd


def _load_state(patched: PatchedModel, sd: dict[str, torch.Tensor], cfg: FitConfig) -> None:
    patched.load_patch_state_dict({k: v for k, v in sd.items() if k.startswith("harden.")})
    if cfg.full:
        patched.net.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("base.")})


class _BaseCache:
    """Answers of the frozen base for every training sample: logits and features at each site on the clean
    input (the distillation targets) and, with a skippable prefix, the first site's output for the clean
    and the adversarial input."""

    def __init__(self, patched: PatchedModel, ds: hdata.Dataset, adv: torch.Tensor, cfg: FitConfig,
                 device: torch.device, folder, progress: Progress | None) -> None:
        from .cache import CacheStore, FrozenPrefix

        probe = hdata.to_float(ds.images[:8]).to(device)
        self.prefix, self.note = FrozenPrefix.plan(patched, probe) if cfg.cache else (None, "caching off")
        self.store = CacheStore(cfg.cache_limit, folder)
        n, bs = len(ds), cfg.batch_size
        with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
            logits = patched(probe[:1])
        self.sites = list(patched.sites)
        self.store.create("logits", (n, logits.shape[1]))
        for s in self.sites:
            self.store.create(f"t:{s}", (n, *feats[s].shape[1:]))
        if self.prefix is not None:
            shape = tuple(feats[self.prefix.site].shape[1:])
            self.store.create("clean_site", (n, *shape))
            self.store.create("adv_site", (n, *shape))
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            x = hdata.to_float(ds.images[sl]).to(device)
            with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
                self.store.put("logits", sl, patched(x))
            for s in self.sites:
                self.store.put(f"t:{s}", sl, feats[s])
            if self.prefix is not None:
                self.store.put("clean_site", sl, feats[self.prefix.site])
                self.store.put("adv_site", sl, self.prefix.site_output(adv[sl].to(device)))
            if progress:
                progress("cache", min(i + bs, n), n, {})
        if self.store.spilled:
            self.note += f"; {len(self.store.spilled)} array(s) spilled to disk in fp16 (--cache-limit)"

    def targets(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (self.store.get("logits", idx, device),
                {s: self.store.get(f"t:{s}", idx, device) for s in self.sites})

    def feeding(self, which: str, idx: torch.Tensor, device: torch.device):
        if self.prefix is None:
            return nullcontext()
        return self.prefix.feeding(self.store.get(f"{which}_site", idx, device))


def fit(patched: PatchedModel, ds: hdata.Dataset, spec: attacks.AttackSpec, cfg: FitConfig,
        device: torch.device, progress: Progress | None = None, saver: Saver | None = None,
        stop: Callable[[], bool] = lambda: False, val: hdata.Dataset | None = None,
        info: dict | None = None, cache_dir=None,
        on_estimate: Callable[[dict], None] | None = None) -> list[EpochLog]:
    """Train `patched` on `ds` by `cfg.method`. With a `saver`, state is saved atomically at the end of
    every epoch (and every `saver.every_steps` steps), and when `stop()` turns true, after which
    `Interrupted` is raised; `saver.resume` continues bit-identically from the saved state. With `val`
    (and `cfg.select`), the epoch with the best white-box validation accuracy is kept. `on_estimate` is called
    once, after the first few timed steps, with the estimated seconds left (`Clock.estimate`)."""
    if cfg.spec.dual_bn and not patched.has_auxbn:
        raise InputError(f"--method {cfg.method} needs auxiliary BNs (--bn all): the model has none attached")
    if cfg.select and val is None:
        raise InputError("--select-on needs a validation split")  # (the CLI always gives one)
    teacher = patched.base_copy() if cfg.full else Disabled(patched)
    params = _trainable(patched, cfg)
    if not params:
        raise InputError("nothing to train: no patch parameters")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps_per_epoch))
    base_before = {k: v.detach().clone() for k, v in patched.base_state_dict().items()}
    g = torch.Generator().manual_seed(cfg.seed)
    logs: list[EpochLog] = []
    start_epoch, start_step, perm, sums, best = 0, 0, None, None, None
    if saver is not None and saver.resume:
        st = saver.load()
        _load_state(patched, st["model"], cfg)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        g.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        logs = [EpochLog(**e) for e in st["logs"]]
        start_epoch, start_step, perm, sums, best = st["epoch"], st["step"], st["perm"], st["sums"], st["best"]

    def save(epoch: int, step: int) -> None:
        if saver is not None:
            saver.save({"model": _state_of(patched, cfg), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": g.get_state(),
                        "torch_rng": torch.get_rng_state(), "logs": [asdict(e) for e in logs],
                        "epoch": epoch, "step": step, "perm": perm, "sums": sums, "best": best})

    cached_adv, adv_bytes, spill_dir = None, 0, None
    if cfg.cached_adversarials:
        if cfg.augment:
            raise InputError(f"--method {cfg.method} makes its adversarial examples once (stage 1): drop --augment")
        adv_bytes = len(ds) * int(ds.images[0].numel()) * 4
        if adv_bytes <= cfg.cache_limit:
            cached_adv = saver.load_adv() if saver is not None else None
            if cached_adv is None:
                cached_adv = _base_adversarials(teacher, ds, spec, cfg.batch_size, device, progress, stop)
                if cached_adv is None:  # stopped while attacking: nothing worth keeping yet
                    raise Interrupted("interrupted before training started; nothing to resume")
                if saver is not None:
                    saver.save_adv(cached_adv)
        else:  # too large for memory: fp16 on disk, which is also what a resumed run reads
            cached_adv, spill_dir = _spilled_adversarials(teacher, ds, spec, cfg, device, progress, stop, saver,
                                                          cache_dir)
            adv_bytes = 0
    base_cache = None
    if cached_adv is not None and not cfg.full:
        t_cache = time.time()
        base_cache = _BaseCache(patched, ds, cached_adv, replace(cfg, cache_limit=max(0, cfg.cache_limit - adv_bytes)),
                                device, cache_dir, progress)
        if info is not None:
            info.update(cache=base_cache.note, cache_seconds=time.time() - t_cache,
                        cache_bytes_in_memory=base_cache.store.used, cache_spilled=list(base_cache.store.spilled))
    abar = None
    if cfg.spec.amend:
        n_classes = spec.n_classes
        abar = vulnerability(ds, cached_adv, teacher, n_classes, cfg.batch_size, device).to(device)
    validate = _Validation(val, spec, max(cfg.batch_size, 256), device, teacher) if val is not None else None
    # Routes: patches train the twins (route adv) on every input; dual-BN methods keep clean inputs on main.
    clean_route, adv_route = ("main", "adv") if cfg.spec.dual_bn else ("adv", "adv")
    total_steps = cfg.epochs * steps_per_epoch
    n_vals = sum(1 for e in range(start_epoch, cfg.epochs) if (e + 1) % cfg.validate_every == 0 or e + 1 == cfg.epochs)
    clock = Clock(total_steps - (start_epoch * steps_per_epoch + start_step), n_vals if validate else 0,
                  cfg.batch_size * train_units(cfg, spec), len(val) * VAL_UNITS if validate else 0, on_estimate)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            if perm is None:
                sums = dict(loss=0.0, ce_clean=0.0, ce_adv=0.0, distill=0.0, acc_clean=0.0, acc_adv=0.0)
                perm = torch.randperm(len(ds), generator=g)
            assert sums is not None
            for step in range(start_step, steps_per_epoch):
                done = epoch * steps_per_epoch + step
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                x, y = ds.batch(idx)
                if cfg.augment:
                    x = hdata.augment(x, g)
                x, y = x.to(device), y.to(device)
                # Targets of the distillation: the (original) base on the clean input.
                if base_cache is not None:
                    base_logits, targets = base_cache.targets(idx, device)
                else:
                    with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
                        base_logits = teacher(x) if cfg.full else patched(x)
                    targets = {s: feats[s].detach() for s in patched.sites} if not cfg.full else {}
                # This step's attack: eps ramps up over cfg.eps_warmup epochs; a fresh seed per step.
                ramp = min(1.0, (done + 1) / (cfg.eps_warmup * steps_per_epoch)) if cfg.eps_warmup else 1.0
                step_spec = replace(spec, eps=spec.eps * ramp, seed=spec.seed + 7919 * (done + 1), settings={})
                if cfg.noise_sigma:  # Gaussian noise from the run's generator (saved with the state: resumable)
                    x_adv = x + cfg.noise_sigma * torch.randn(x.shape, generator=g).to(device)
                elif cached_adv is not None:
                    x_adv = cached_adv[idx].to(device)
                elif not cfg.adaptive:
                    x_adv = attacks.project(x, attacks.build(teacher, step_spec)(x, y), step_spec.eps, spec.norm)
                else:
                    patched.eval()
                    with patched.route("adv"):
                        x_adv = attacks.project(x, attacks.build(patched, step_spec)(x, y), step_spec.eps, spec.norm)
                patched.train()
                feed_clean = base_cache.feeding("clean", idx, device) if base_cache is not None else nullcontext()
                with patched.route(clean_route), patched.capture() as f_clean, feed_clean:
                    out_clean = patched(x)
                feed_adv = base_cache.feeding("adv", idx, device) if base_cache is not None else nullcontext()
                with patched.route(adv_route), patched.capture() as f_adv, feed_adv:
                    out_adv = patched(x_adv)
                ce_clean = losses.focal_ce(out_clean, y, cfg.gamma)
                if abar is not None:  # AdvAmd: mediate samples on the main BNs, Ā-weighted adversarial CE
                    with patched.route("main"):
                        out_med = patched(x + cfg.phi * (x_adv - x))
                    ce_adv = (abar[y] * losses.focal_ce(out_adv, y, cfg.gamma, reduction="none")).mean()
                    b1, b2, b3 = cfg.betas
                    loss = b1 * ce_clean + b2 * losses.focal_ce(out_med, y, cfg.gamma) + b3 * ce_adv
                elif cfg.noise_sigma:  # stability: the noisy input must get the base's class of the clean one
                    ce_adv = losses.focal_ce(out_adv, base_logits.argmax(1), cfg.gamma)
                    loss = ce_adv
                else:
                    ce_adv = ADV_LOSSES[cfg.loss](out_adv, out_clean, y, cfg)
                    loss = ce_clean + ce_adv
                distill = torch.zeros((), device=device)
                if targets and cfg.lam:
                    distill = (losses.feature_distillation(f_clean, targets)
                               + losses.feature_distillation(f_adv, targets))
                    loss = loss + cfg.lam * distill
                if cfg.mu:
                    loss = loss + cfg.mu * losses.logit_distillation(out_clean, base_logits)
                if not torch.isfinite(loss):
                    raise RunError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                                   "lower --lr or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                clock.step()
                b = len(y)
                sums["loss"] += loss.item() * b
                sums["ce_clean"] += ce_clean.item() * b
                sums["ce_adv"] += ce_adv.item() * b
                sums["distill"] += distill.item() * b
                sums["acc_clean"] += float((out_clean.argmax(1) == y).sum())
                sums["acc_adv"] += float((out_adv.argmax(1) == y).sum())
                if progress:
                    progress("train", done + 1, total_steps,
                             {"epoch": epoch + 1, "loss": loss.item(), "ce": ce_clean.item(),
                              "ce_adv": ce_adv.item(), "distill": distill.item(), "eta": clock.eta_text()})
                if stop():
                    save(epoch, step + 1)
                    where = f"'{saver.path}'; rerun with --resume" if saver is not None else "nowhere (no state file)"
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, step {step + 1}: state saved to {where}")
                if saver is not None and saver.every_steps and (done + 1) % saver.every_steps == 0:
                    save(epoch, step + 1)
            n = len(ds)
            log = EpochLog(epoch + 1, **{k: v / n for k, v in sums.items()}, seconds=time.time() - t0)
            if validate is not None and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs):
                t_val = time.time()
                log.val_clean, log.val_robust, log.val_transfer = validate(patched)
                log.val_seconds = time.time() - t_val
                clock.validated(log.val_seconds)
                score = (log.val_robust, log.val_clean)
                if cfg.select and (best is None or score > tuple(best["score"])):
                    best = {"score": list(score), "epoch": epoch + 1, "state": _state_of(patched, cfg)}
            logs.append(log)
            perm, sums, start_step = None, None, 0
            converged = cfg.spec.amend and log.loss < cfg.sigma
            save(cfg.epochs if converged else epoch + 1, 0)
            if converged:
                break
    except RunError as e:
        if saver is not None and not saver.path.exists():
            saver.clear()  # nothing to resume from: the cached adversarial examples would only be left over
            raise
        if saver is not None:
            raise RunError(f"{e.message}; the last good state is kept in '{saver.path}' (--resume continues "
                           "from it)") from None
        raise
    finally:
        if base_cache is not None:
            base_cache.store.close()
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
    if best is not None:
        _load_state(patched, best["state"], cfg)
    patched.eval()
    for p in params:
        p.requires_grad_(False)
    patched.finetune_base = False
    patched.train(False)
    if not cfg.full:
        for k, v in patched.base_state_dict().items():
            if not torch.equal(v, base_before[k]):
                raise RunError(f"internal error: base tensor '{k}' changed during training; nothing was written")
    return logs


def selected_epoch(logs: list[EpochLog], cfg: FitConfig) -> int | None:
    """The epoch kept by --select-on (best white-box validation accuracy, then clean), else None."""
    scored = [(e.val_robust, e.val_clean, -e.epoch) for e in logs if e.val_robust is not None]
    return -max(scored)[2] if cfg.select and scored else None


def record(cfg: FitConfig, spec: attacks.AttackSpec, logs: list[EpochLog], ds: hdata.Dataset,
           subset: str | None) -> dict:
    """The training record stored in the manifest: no wall times, so equal runs give equal files."""
    import torchattacks

    epochs = [{k: v for k, v in asdict(e).items() if k not in ("seconds", "val_seconds")} for e in logs]
    return {"config": asdict(cfg), "attack": spec.record(), "epochs": epochs, "seed": cfg.seed,
            "data": {"source": ds.source, "fingerprint": ds.fingerprint(), "n": len(ds), "subset": subset},
            "torch": torch.__version__, "torchattacks": torchattacks.__version__}
