"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): certified L2 robustness of g(x) = argmax_c P(f(x+δ) = c),
δ ~ N(0, σ²I), for any classifier f that takes [0, 1] pixels (a plain or patched model).

CERTIFY draws n0 noisy copies to select the top class, then n fresh ones (independent of the first: one seeded
generator, consecutive draws, never reused) to bound its probability from below (one-sided Clopper-Pearson at
level 1 - alpha); below 1/2 it abstains, else the certified radius is σ Φ⁻¹(p_A lower). PREDICT abstains unless a
two-sided binomial test between the top two classes rejects p = 1/2 at level alpha. Noise is added in pixel
space without clipping, as in the paper.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import InputError

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class SmoothingConfig:
    sigma: float = 0.25
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise InputError(f"--sigma must be a positive number, got {self.sigma}")
        if self.n0 < 1 or self.n < 1 or self.batch_size < 1:
            raise InputError("--n0, --n and --batch-size must be at least 1")
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha must be in (0, 1), got {self.alpha}")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion from k successes in n trials."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def binom_pvalue(k: int, n: int) -> float:
    """Two-sided exact binomial test of p = 1/2."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5).pvalue) if n else 1.0


def radius_of(p_lower: float, sigma: float) -> float:
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_lower))


class Smoothed:
    """The smoothed classifier of `model` (eval mode, no gradients) with seeded, recorded noise."""

    def __init__(self, model: nn.Module, n_classes: int, cfg: SmoothingConfig, device: torch.device) -> None:
        self.model, self.n_classes, self.cfg, self.device = model.eval(), n_classes, cfg, device

    def generator(self, index: int) -> torch.Generator:
        """The noise stream of sample `index`: its own seed, so results do not depend on order or sharding."""
        return torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + index)

    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, g: torch.Generator) -> torch.Tensor:
        """Class counts of f(x + δ) over `num` fresh noise draws from `g`."""
        out = torch.zeros(self.n_classes, dtype=torch.long)
        left = num
        while left > 0:
            b = min(self.cfg.batch_size, left)
            noise = torch.randn((b, *x.shape), generator=g) * self.cfg.sigma
            pred = self.model((x.unsqueeze(0) + noise).to(self.device)).argmax(1).cpu()
            out += torch.bincount(pred, minlength=self.n_classes)[: self.n_classes]
            left -= b
        return out

    def certify(self, x: torch.Tensor, index: int) -> tuple[int, float]:
        """(class, radius), or (ABSTAIN, 0.0)."""
        g = self.generator(index)
        top = int(self.counts(x, self.cfg.n0, g).argmax())  # selection
        k = int(self.counts(x, self.cfg.n, g)[top])  # estimation: later draws of the same stream
        p_lower = lower_confidence_bound(k, self.cfg.n, self.cfg.alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return top, radius_of(p_lower, self.cfg.sigma)

    def predict(self, x: torch.Tensor, index: int) -> int:
        c = self.counts(x, self.cfg.n, self.generator(index))
        top2 = torch.topk(c, 2).indices.tolist() if self.n_classes > 1 else [0, 0]
        na, nb = int(c[top2[0]]), int(c[top2[1]])
        return top2[0] if binom_pvalue(na, na + nb) <= self.cfg.alpha else ABSTAIN


@dataclass
class CertifyResult:
    config: dict
    rows: list[dict] = field(default_factory=list)  # idx, label, predict, radius, correct, seconds

    def certified_accuracy(self, r: float) -> float:
        hits = sum(1 for row in self.rows if row["correct"] and row["radius"] >= r)
        return hits / max(1, len(self.rows))

    def summary(self, radii: tuple[float, ...] = RADII) -> dict:
        n = len(self.rows)
        abstained = sum(1 for row in self.rows if row["predict"] == ABSTAIN)
        return {"n": n, "sigma": self.config["sigma"], "n0": self.config["n0"], "N": self.config["n"],
                "alpha": self.config["alpha"], "seed": self.config["seed"],
                "clean_accuracy_smoothed": round(self.certified_accuracy(0.0), 4),
                "abstention_rate": round(abstained / max(1, n), 4),
                "certified_accuracy": {f"{r:g}": round(self.certified_accuracy(r), 4) for r in radii},
                "max_certifiable_radius": round(radius_of(lower_confidence_bound(self.config["n"], self.config["n"],
                                                                                 self.config["alpha"]),
                                                          self.config["sigma"]), 4),
                "seconds_per_image": round(sum(r["seconds"] for r in self.rows) / max(1, n), 4)}

    def to_tsv(self) -> str:
        lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
        lines += [f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.4f}\t{int(r['correct'])}\t"
                  f"{r['seconds']:.3f}" for r in self.rows]
        return "\n".join(lines) + "\n"


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SmoothingConfig, n_classes: int,
            device: torch.device, progress=None, done: list[dict] | None = None,
            on_row=None) -> CertifyResult:
    """CERTIFY every sample of (x, y); `done` rows (a resumed run) are kept and skipped."""
    res = CertifyResult(config=asdict(cfg), rows=list(done or []))
    seen = {r["idx"] for r in res.rows}
    sm = Smoothed(model, n_classes, cfg, device)
    for i in range(len(x)):
        if i in seen:
            continue
        t0 = time.time()
        c, r = sm.certify(x[i], i)
        row = {"idx": i, "label": int(y[i]), "predict": c, "radius": r, "correct": bool(c == int(y[i])),
               "seconds": time.time() - t0}
        res.rows.append(row)
        if on_row is not None:
            on_row(row)
        if progress:
            progress("certify", len(res.rows), len(x), {"certified_acc_r0": res.certified_accuracy(0.0)})
    res.rows.sort(key=lambda r: r["idx"])
    return res
