"""Inference-time post-training (Yan & Ng, adaptive-post-training-at-inference.md, Algorithms 1-2).

For each input x': its original class y' = f(x'); its neighbour class y'' = f(x''), where x'' is an
untargeted attack on x' against y' (PGD from δ = 0, L steps) — or, with `neighbour="targeted"`, the
class whose targeted attack reaches the highest confidence. When y'' = y' the input is answered as is.
Otherwise a copy of the model is adversarially fine-tuned for K iterations on a balanced batch of M/2
reference samples of y' and M/2 of y'' (`fast`: FGSM with random start; `pgd`: PGD-k with random
start; `fixed`: the fixed perturbation δ_fix = x'' − x' of eq. 5), and that copy answers. Every input
gets its own copy; the stored model never changes.

What is trained (`adapt`): `patches` — only the patch parameters of a patched checkpoint (the frozen-base
variant); `all` — every weight. BatchNorm layers stay in eval mode (a two-class batch would corrupt their
statistics). SGD with momentum 0.9, as in the paper.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import attacks as A
from .. import data as hdata
from ..errors import InputError
from ..patches import PatchedModel
from .threats import acc

NEIGHBOURS = ("pgd", "targeted")
POST_TRAIN = ("fast", "pgd", "fixed")
ADAPT = ("patches", "all")


@dataclass
class AdaptiveConfig:
    eps: float = 0.1
    neighbour: str = "pgd"
    neighbour_steps: int = 20  # L
    iterations: int = 10  # K
    batch: int = 128  # M (M/2 per class)
    post_train: str = "fixed"
    pgd_steps: int = 5  # attack steps of post_train="pgd"
    adapt: str = "patches"
    lr: float = 1e-3
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, choices in (("--neighbour", self.neighbour, NEIGHBOURS),
                                     ("--post-train", self.post_train, POST_TRAIN), ("--adapt", self.adapt, ADAPT)):
            if value not in choices:
                raise InputError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
        if self.batch < 2 or self.iterations < 0 or self.neighbour_steps < 1:
            raise InputError("--batch-size must be at least 2, --iterations at least 0, --neighbour-steps at least 1")
        if self.eps <= 0:
            raise InputError("--eps must be positive for the neighbour search")


def _pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, alpha: float,
         targeted: bool = False, start: torch.Tensor | None = None) -> torch.Tensor:
    """Linf PGD on [0, 1] pixels; from `start` (a perturbation) or δ = 0."""
    delta = torch.zeros_like(x) if start is None else start.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + (-alpha if targeted else alpha) * g.sign()).clamp(-eps, eps)
    return (x + delta.detach()).clamp(0, 1)


class AdaptivePredictor:
    """Post-trains a per-input copy of `model` at inference (see the module docstring)."""

    def __init__(self, model: PatchedModel, reference: hdata.Dataset, cfg: AdaptiveConfig,
                 device: torch.device) -> None:
        if cfg.adapt == "patches" and not any(True for _ in model.patch_parameters()):
            raise InputError("--adapt patches needs a patched checkpoint (this model has no patches); "
                             "use --adapt all to post-train every weight")
        self.model, self.cfg, self.device = model.eval(), cfg, device
        self.reference = reference
        self.by_class = {int(c): torch.nonzero(reference.labels == c).flatten() for c in torch.unique(reference.labels)}

    # -- Algorithm 1
    def neighbour(self, x1: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(y', y'', x'') for one input x' of shape (1, C, H, W)."""
        cfg, m = self.cfg, self.model
        with torch.no_grad():
            logits = m(x1)
        y1 = int(logits.argmax(1))
        alpha = 2.5 * cfg.eps / cfg.neighbour_steps
        if cfg.neighbour == "pgd":
            x2 = _pgd(m, x1, torch.tensor([y1], device=x1.device), cfg.eps, cfg.neighbour_steps, alpha)
            with torch.no_grad():
                y2 = int(m(x2).argmax(1))
            return y1, y2, x2
        n = logits.shape[1]
        others = [c for c in range(n) if c != y1]
        xs = x1.expand(len(others), *x1.shape[1:])
        adv = _pgd(m, xs, torch.tensor(others, device=x1.device), cfg.eps, cfg.neighbour_steps, alpha, targeted=True)
        with torch.no_grad():
            p = F.softmax(m(adv), 1)
        conf = p[torch.arange(len(others)), torch.tensor(others)]
        best = int(conf.argmax())
        reached = int(p[best].argmax()) == others[best]
        return y1, (others[best] if reached else y1), adv[best:best + 1]

    # -- Algorithm 2
    def _copy(self) -> tuple[PatchedModel, list[torch.nn.Parameter]]:
        c = self.model.clone().eval()
        params = list(c.patch_parameters()) if self.cfg.adapt == "patches" else list(c.parameters())
        for p in c.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return c, params

    def _batch(self, y1: int, y2: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.cfg.batch // 2
        idx, labels = [], []
        for c in (y1, y2):
            pool = self.by_class.get(c)
            if pool is None or len(pool) == 0:
                raise InputError(f"--reference-data has no samples of class {c}: it needs every class the model "
                                 "can predict")
            pick = pool[torch.randint(len(pool), (half,), generator=g)]
            idx.append(pick)
            labels.append(torch.full((half,), c, dtype=torch.int64))
        x, _ = self.reference.batch(torch.cat(idx))
        return x.to(self.device), torch.cat(labels).to(self.device)

    def post_train(self, x1: torch.Tensor, y1: int, y2: int, x2: torch.Tensor, g: torch.Generator) -> PatchedModel:
        cfg = self.cfg
        copy_, params = self._copy()
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        xb, yb = self._batch(y1, y2, g)
        delta_fix = (x2 - x1).detach()
        for _ in range(cfg.iterations):
            if cfg.post_train == "fixed":
                xa = (xb + delta_fix).clamp(0, 1)
            else:
                start = (torch.rand(xb.shape, generator=g).to(self.device) * 2 - 1) * cfg.eps
                steps, alpha = (1, 1.25 * cfg.eps) if cfg.post_train == "fast" else \
                    (cfg.pgd_steps, 2.5 * cfg.eps / cfg.pgd_steps)
                xa = _pgd(copy_, xb, yb, cfg.eps, steps, alpha, start=start)
            loss = F.cross_entropy(copy_(xa), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        return copy_.eval()

    def predict_one(self, x: torch.Tensor, index: int) -> tuple[dict, PatchedModel]:
        """Answer one input (1, C, H, W); also returns the model that answered it."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        y1, y2, x2 = self.neighbour(x)
        model = self.model
        if y2 != y1:
            model = self.post_train(x, y1, y2, x2, g)
        with torch.no_grad():
            p = F.softmax(model(x), 1)[0]
        pred = int(p.argmax())
        return ({"index": index, "prediction": pred, "confidence": float(p[pred]), "original_class": y1,
                 "neighbour_class": y2, "post_trained": y2 != y1, "seconds": time.perf_counter() - t0}, model)

    def predict(self, x: torch.Tensor, progress=None) -> list[dict]:
        out = []
        for i in range(len(x)):
            out.append(self.predict_one(x[i:i + 1].to(self.device), i)[0])
            if progress:
                progress("adaptive predict", i + 1, len(x), {})
        return out

    def record(self) -> dict:
        return asdict(self.cfg)


def end_to_end_attack(pred: AdaptivePredictor, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                      progress=None) -> torch.Tensor:
    """An attack through the whole adaptive procedure, BPDA-style: at each of `steps` PGD steps the procedure
    runs on the current adversarial input (neighbour search and post-training), and the gradient is taken
    through the copy that would answer it, treating its post-trained weights as constants. Returns, per
    input, whether the adaptive predictor still answers correctly on the final adversarial input."""
    alpha = 2.5 * eps / max(1, steps)
    robust = torch.ones(len(x), dtype=torch.bool)
    for i in range(len(x)):
        xi, yi = x[i:i + 1].to(pred.device), y[i:i + 1].to(pred.device)
        adv = xi.clone()
        for _ in range(steps):
            res, model = pred.predict_one(adv, i)
            if res["prediction"] != int(yi):
                break
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), yi)
            (g,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = (xi + (adv + alpha * g.sign() - xi).clamp(-eps, eps)).clamp(0, 1)
        res, _ = pred.predict_one(adv.detach(), i)
        robust[i] = res["prediction"] == int(yi)
        if progress:
            progress("end-to-end attack", i + 1, len(x), {})
    return robust


def evaluate_adaptive(pred: AdaptivePredictor, x: torch.Tensor, y: torch.Tensor, spec, e2e_samples: int,
                      e2e_steps: int, progress=None) -> dict:
    """Static vs adaptive accuracy, in the paper's threat model and end to end.

    static-transfer: adversarial examples computed on the static model (the checkpoint as stored, white-box
    for it), answered by the adaptive predictor — the paper's setting. end-to-end: `end_to_end_attack` on the
    first `e2e_samples` inputs (BPDA-style approximation, named as such in the report)."""
    static, device = pred.model, pred.device
    attack = A.build(static, spec)
    advs = []
    for i in range(0, len(x), 256):
        xb, yb = x[i:i + 256].to(device), y[i:i + 256].to(device)
        advs.append(A.project(xb, attack(xb, yb), spec.eps, spec.norm).cpu())
    adv = torch.cat(advs)
    with torch.no_grad():
        static_clean = torch.cat([static(x[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x), 256)]) == y
        static_adv = torch.cat([static(adv[i:i + 256].to(device)).argmax(1).cpu()
                                for i in range(0, len(x), 256)]) == y
    t0 = time.perf_counter()
    clean_res = pred.predict(x, progress)
    adv_res = pred.predict(adv, progress)
    seconds = (time.perf_counter() - t0) / (2 * len(x))
    ad_clean = torch.tensor([r["prediction"] for r in clean_res]) == y
    ad_adv = torch.tensor([r["prediction"] for r in adv_res]) == y
    neighbour = torch.tensor([int(y[i]) in (r["original_class"], r["neighbour_class"]) for i, r in enumerate(adv_res)])
    n_e2e = min(e2e_samples, len(x))
    e2e = None
    if n_e2e:
        t1 = time.perf_counter()
        robust = end_to_end_attack(pred, x[:n_e2e], y[:n_e2e], spec.eps, e2e_steps, progress)
        e2e = {"n": n_e2e, "steps": e2e_steps, "robust": acc(robust),
               "static_robust_same_samples": acc(static_adv[:n_e2e]),
               "seconds": time.perf_counter() - t1,
               "method": "PGD through the whole procedure, BPDA-style: every step reruns the neighbour search and "
                         "post-training on the current adversarial input and follows the gradient of the copy that "
                         "answers it, its weights treated as constants; an approximation of a full adaptive attack"}
    return {
        "threat_models": {
            "static_transfer": "adversarial examples computed white-box on the static model (the checkpoint as "
                               "stored), answered by the adaptive predictor (the paper's setting)",
            "end_to_end": "the attacker runs the adaptive procedure inside the attack (approximation, see method)"},
        "n": len(y), "attack": spec.record(), "adaptive": pred.record(),
        "static": {"clean": acc(static_clean), "robust_static_whitebox": acc(static_adv)},
        "adaptive_predictor": {"clean": acc(ad_clean), "robust_static_transfer": acc(ad_adv),
                               "neighbour_accuracy_adversarial": acc(neighbour),
                               "neighbour_accuracy_clean": acc(torch.tensor(
                                   [int(y[i]) in (r["original_class"], r["neighbour_class"])
                                    for i, r in enumerate(clean_res)])),
                               "post_trained_fraction": sum(r["post_trained"] for r in clean_res + adv_res)
                               / (2 * len(x)),
                               "seconds_per_image": seconds},
        "end_to_end": e2e,
    }
