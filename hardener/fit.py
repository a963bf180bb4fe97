"""Training loop of the patches (fixer paper §3.2): only patch parameters get gradients.

Loss per batch: focal CE on the clean and the adversarial input, plus λ · feature distillation
(MSE, element mean, between the features after each patch and the *base's features of the
clean input* at that site — for the clean and the adversarial input alike: the paper's text says
adversarial features are brought back to natural ones), plus optionally μ · KL to the base logits
on the clean input.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import attacks, data as hdata, losses
from .errors import InputError, RunError
from .patches import PatchedModel
from .patches.attach import Disabled
from .resume import Interrupted, Saver


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

    def __post_init__(self) -> None:
        if self.adversary not in ("base", "patched"):
            raise InputError(f"--adversary must be base or patched, got '{self.adversary}'")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("--epochs and --batch-size must be at least 1")


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


Progress = Callable[[str, int, int, dict], None]


def warmup_cosine(total: int, warmup_frac: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over the first steps, then cosine decay to zero."""
    warm = max(1, int(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return factor


def _base_adversarials(patched: PatchedModel, ds: hdata.Dataset, spec: attacks.AttackSpec, batch_size: int,
                       device: torch.device, progress: Progress | None,
                       stop: Callable[[], bool] = lambda: False) -> torch.Tensor | None:
    """Adversarial examples of the frozen base for the whole set, computed once (transfer setting).

    None when `stop()` turned true on the way."""
    attack = attacks.build(Disabled(patched), spec)
    out = torch.empty(ds.images.shape, dtype=torch.float32)
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


def fit(patched: PatchedModel, ds: hdata.Dataset, spec: attacks.AttackSpec, cfg: FitConfig,
        device: torch.device, progress: Progress | None = None, saver: Saver | None = None,
        stop: Callable[[], bool] = lambda: False) -> list[EpochLog]:
    """Train the patches of `patched` on `ds`. With a `saver`, state is saved atomically at the end of
    every epoch (and every `saver.every_steps` steps), and when `stop()` turns true, after which
    `Interrupted` is raised; `saver.resume` continues bit-identically from the saved state."""
    params = [p for p in patched.patch_parameters()]
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
    start_epoch, start_step, perm, sums = 0, 0, None, None
    if saver is not None and saver.resume:
        st = saver.load()
        patched.load_patch_state_dict(st["patches"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        g.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        logs = [EpochLog(**e) for e in st["logs"]]
        start_epoch, start_step, perm, sums = st["epoch"], st["step"], st["perm"], st["sums"]

    def save(epoch: int, step: int) -> None:
        if saver is not None:
            saver.save({"patches": patched.patch_state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": g.get_state(),
                        "torch_rng": torch.get_rng_state(), "logs": [asdict(e) for e in logs],
                        "epoch": epoch, "step": step, "perm": perm, "sums": sums})

    cached_adv = None
    if cfg.adversary == "base" and not cfg.augment:
        cached_adv = saver.load_adv() if saver is not None else None
        if cached_adv is None:
            cached_adv = _base_adversarials(patched, ds, spec, cfg.batch_size, device, progress, stop)
            if cached_adv is None:  # stopped while attacking: nothing worth keeping yet
                raise Interrupted("interrupted before training started; nothing to resume")
            if saver is not None:
                saver.save_adv(cached_adv)
    base_attack = attacks.build(Disabled(patched), spec)
    patched_attack = attacks.build(patched, spec)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        if perm is None:
            sums = dict(loss=0.0, ce_clean=0.0, ce_adv=0.0, distill=0.0, acc_clean=0.0, acc_adv=0.0)
            perm = torch.randperm(len(ds), generator=g)
        assert sums is not None
        for step in range(start_step, steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, y = ds.batch(idx)
            if cfg.augment:
                x = hdata.augment(x, g)
            x, y = x.to(device), y.to(device)
            # Base features of the clean input: the distillation targets.
            with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
                base_logits = patched(x)
            targets = {s: feats[s].detach() for s in patched.sites}
            if cached_adv is not None:
                x_adv = cached_adv[idx].to(device)
            elif cfg.adversary == "base":
                x_adv = attacks.project(x, base_attack(x, y), spec.eps, spec.norm)
            else:
                patched.eval()
                x_adv = attacks.project(x, patched_attack(x, y), spec.eps, spec.norm)
            patched.train()
            with patched.capture() as f_clean:
                out_clean = patched(x)
            with patched.capture() as f_adv:
                out_adv = patched(x_adv)
            ce_clean = losses.focal_ce(out_clean, y, cfg.gamma)
            ce_adv = losses.focal_ce(out_adv, y, cfg.gamma)
            distill = losses.feature_distillation(f_clean, targets) + losses.feature_distillation(f_adv, targets)
            loss = ce_clean + ce_adv + cfg.lam * distill
            if cfg.mu:
                loss = loss + cfg.mu * losses.logit_distillation(out_clean, base_logits)
            if not torch.isfinite(loss):
                raise RunError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                               "lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            b = len(y)
            sums["loss"] += loss.item() * b
            sums["ce_clean"] += ce_clean.item() * b
            sums["ce_adv"] += ce_adv.item() * b
            sums["distill"] += distill.item() * b
            sums["acc_clean"] += float((out_clean.argmax(1) == y).sum())
            sums["acc_adv"] += float((out_adv.argmax(1) == y).sum())
            if progress:
                progress("train", epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch,
                         {"epoch": epoch + 1, "loss": loss.item(), "ce": ce_clean.item(),
                          "ce_adv": ce_adv.item(), "distill": distill.item()})
            if stop():
                save(epoch, step + 1)
                where = f"'{saver.path}'; rerun with --resume" if saver is not None else "nowhere (no state file)"
                raise Interrupted(f"interrupted at epoch {epoch + 1}, step {step + 1}: state saved to {where}")
            done = epoch * steps_per_epoch + step + 1
            if saver is not None and saver.every_steps and done % saver.every_steps == 0:
                save(epoch, step + 1)
        n = len(ds)
        logs.append(EpochLog(epoch + 1, **{k: v / n for k, v in sums.items()}, seconds=time.time() - t0))
        perm, sums, start_step = None, None, 0
        save(epoch + 1, 0)
    patched.eval()
    for p in params:
        p.requires_grad_(False)
    for k, v in patched.base_state_dict().items():
        if not torch.equal(v, base_before[k]):
            raise RunError(f"internal error: base tensor '{k}' changed during training; nothing was written")
    return logs


def record(cfg: FitConfig, spec: attacks.AttackSpec, logs: list[EpochLog], ds: hdata.Dataset,
           subset: str | None) -> dict:
    """The training record stored in the manifest: no wall times, so equal runs give equal files."""
    import torchattacks

    epochs = [{k: v for k, v in asdict(e).items() if k != "seconds"} for e in logs]
    return {"config": asdict(cfg), "attack": spec.record(), "epochs": epochs, "seed": cfg.seed,
            "data": {"source": ds.source, "fingerprint": ds.fingerprint(), "n": len(ds), "subset": subset},
            "torch": torch.__version__, "torchattacks": torchattacks.__version__}
