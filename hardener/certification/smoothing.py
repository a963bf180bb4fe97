"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): certified L2 robustness of g(x) = argmax_c P(f(x+δ) = c),
δ ~ N(0, σ²I), for any classifier f that takes [0, 1] pixels (a plain or patched model).

CERTIFY draws n0 noisy copies to select the top class, then n fresh ones (independent of the first: one seeded
generator, consecutive draws, never reused) to bound its probability from below (one-sided Clopper-Pearson at
level 1 - alpha); below 1/2 it abstains, else the certified radius is σ Φ⁻¹(p_A lower). PREDICT abstains unless a
two-sided binomial test between the top two classes rejects p = 1/2 at level alpha. Noise is added in pixel
space without clipping, as in the paper.

Sequential CERTIFY (`sequential=True`) keeps the selection step and replaces the fixed-n estimation by draws in
growing batches with a bound that holds at every look at once: the lower end of a confidence sequence for p_A, the
beta-binomial mixture of likelihood ratios (Robbins 1970; Howard et al. 2021), whose martingale exceeds 1/alpha with
probability at most alpha over the whole sequence (Ville's inequality), run at (1 - CAP_SHARE) alpha; a sample that
reaches the cap (n draws) also gets one Clopper-Pearson look at CAP_SHARE alpha, the better bound kept. By a union
bound the radius at whatever look a sample stops is over-stated with probability at most alpha, as CERTIFY's, and a
sample that runs to the cap is never certified much below what fixed-n CERTIFY gives it. A sample stops once its
bound reaches the largest radius asked for (`max_radius`), once it can certify none (the sequence's upper end below
1/2), once its place among the reported radii is decided (no reported radius's threshold Φ(r/σ) lies inside the
sequence), once the next threshold above its bound is out of reach (even an estimate REACH_Z standard errors above
the observed share would leave the bound below it after all n draws: the samples whose p_A sits on a threshold,
which would otherwise all run to the cap), or at n draws. Whatever rule stops a sample, the bound at that look is
valid: the rules choose how many draws to spend, never the guarantee. A Clopper-Pearson bound recomputed at every
look would over-state radii far more often than alpha (the test shows it).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..errors import InputError
from ..options.defaults import CERTIFY
from ..options.validate import check_range
from ..stats import wilson

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
FIRST_LOOK = 100  # sequential: draws before the first look; each later batch doubles the draws, up to batch_size
REACH_Z = 2.0  # sequential: a threshold is out of reach when p_A's estimate + REACH_Z standard errors cannot pass it
# sequential: the share of alpha kept for one fixed-n look (Clopper-Pearson) at the cap; the confidence sequence gets
# the rest. By a union bound the guarantee stays alpha; a sample that runs to the cap is then never certified much
# below what fixed-n CERTIFY would give it (a bound valid at every look is wider than one valid at one)
CAP_SHARE = 0.1
STOPS = ("radius", "abstain", "decided", "reach", "cap")  # why a sequential sample stopped ("fixed": fixed n)


@dataclass
class SmoothingConfig:
    sigma: float = CERTIFY["sigma"]
    n0: int = CERTIFY["n0"]
    n: int = CERTIFY["n"]
    alpha: float = CERTIFY["alpha"]
    batch_size: int = CERTIFY["batch_size"]
    seed: int = CERTIFY["seed"]
    sequential: bool = CERTIFY["sequential"]
    max_radius: float | None = None  # sequential: stop once this radius is certified (None: 2σ)

    def __post_init__(self) -> None:
        # the options' ranges (validate.OPTION_RULES, what the command line's boundary checks too; alpha a failure
        # probability, not harden patch's step size: validate.COMMAND_RULES)
        for flag, v, rule in (("--max-radius", self.max_radius, "max_radius"), ("--sigma", self.sigma, "sigma"),
                              ("--n0", self.n0, "n0"), ("--n", self.n, "n_samples"),
                              ("--batch-size", self.batch_size, "batch_size"), ("--alpha", self.alpha, "certify_alpha")):
            check_range(flag, v, rule)

    def most_certifiable(self) -> float:
        """The largest radius `n` draws can certify at `alpha` (every draw the top class): the bound's radius, for the
        sequential confidence sequence or the fixed-n Clopper-Pearson one."""
        bound = cap_lower(self.n, self.n, self.alpha) if self.sequential else \
            lower_confidence_bound(self.n, self.n, self.alpha)
        return radius_of(bound, self.sigma)

    def check_reach(self) -> str | None:
        """An `InputError` when `n` draws can certify no radius at all; a note (a warning) when the largest radius a
        sequential run aims for (`max_radius`, default 2σ) lies beyond what they can certify: its samples then stop
        below it and the radius reports 0% by construction."""
        most = self.most_certifiable()
        if most <= 0:
            def certifies(n: int) -> bool:
                return replace(self, n=n, max_radius=None).most_certifiable() > 0
            lo, hi = self.n, 2 * self.n  # the least n that certifies something: bisection (it grows with n)
            while not certifies(hi):
                lo, hi = hi, 2 * hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if certifies(mid) else (mid, hi)
            least = hi
            raise InputError(f"--n {self.n} draws cannot certify any radius at --alpha {self.alpha:g}: even with every "
                             f"draw for the top class its lower bound stays below 1/2; give --n {least} or more "
                             "(100,000 is Cohen et al.'s)")
        if self.sequential and self.top_radius > most + 1e-12:
            asked = f"--max-radius {self.max_radius:g}" if self.max_radius is not None else \
                f"radius {self.top_radius:g} (2σ, the default --max-radius)"
            return (f"{asked} is beyond what --n {self.n} draws can certify at --alpha {self.alpha:g} (at most "
                    f"{most:.3f}): radii above {most:.3f} report 0% by construction; raise --n or lower --max-radius")
        return None

    @property
    def top_radius(self) -> float:
        """The largest radius a sequential run certifies (`max_radius`, default 2σ)."""
        return self.max_radius if self.max_radius is not None else 2 * self.sigma

    def reported_radii(self) -> tuple[float, ...]:
        """RADII, cut at the largest radius a sequential run tries to certify (beyond it, its figures would be
        partial): a fixed-n run reports them all."""
        return tuple(r for r in RADII if not self.sequential or r <= self.top_radius + 1e-12)


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion from k successes in n trials."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def mixture_bounds(k: int, t: int, alpha: float) -> tuple[float, float]:
    """(lower, upper) ends of the anytime-valid (1 - alpha) confidence sequence for a binomial proportion after k
    successes in t draws: the p at which the uniform-prior beta-binomial mixture martingale,
    B(1 + k, 1 + t - k) / (p^k (1 - p)^(t - k)), is below 1/alpha. Its log is convex in p, least at k/t, so the set is
    an interval, found by bisection; P(the true p leaves it at any look) <= alpha."""
    if t == 0:
        return 0.0, 1.0
    # log B(1 + k, 1 + t - k) + log(1/alpha): the budget that -log(p^k (1 - p)^(t - k)) must stay within
    room = math.log(1 / alpha) - (math.lgamma(k + 1) + math.lgamma(t - k + 1) - math.lgamma(t + 2))

    def inside(p: float) -> bool:
        return -(k * math.log(p) if k else 0.0) - ((t - k) * math.log1p(-p) if t > k else 0.0) < room

    def edge(a: float, b: float) -> float:  # a inside, b outside
        for _ in range(50):  # to within 1e-15
            mid = (a + b) / 2
            a, b = (mid, b) if inside(mid) else (a, mid)
        return a
    hat = k / t
    return (0.0 if k == 0 else edge(hat, 0.0)), (1.0 if k == t else edge(hat, 1.0))


def cap_lower(k: int, n: int, alpha: float, bounds=mixture_bounds) -> float:
    """The sequential lower bound of p_A at the cap (n draws): the better of the confidence sequence's, at its share
    of alpha, and Clopper-Pearson's at n, at CAP_SHARE of it."""
    return max(bounds(k, n, alpha * (1 - CAP_SHARE))[0], lower_confidence_bound(k, n, alpha * CAP_SHARE))


def sequential_estimate(draw, cfg: SmoothingConfig, bounds=mixture_bounds) -> tuple[int, int, float, str]:
    """Draw in growing batches (`draw(m)`: the top class's count among m fresh noisy copies) until the sample's
    certificate is decided; returns (count, draws, lower bound of p_A, why it stopped: radius | abstain | decided |
    reach | cap). `bounds(k, t, alpha)` must be anytime-valid: tests pass a naive one to show what that means. The
    sequence runs at (1 - CAP_SHARE) alpha; at the cap, one fixed-n look at the rest (`cap_lower`)."""
    from scipy.stats import norm

    cuts = sorted({0.5, *(float(norm.cdf(r / cfg.sigma)) for r in (*cfg.reported_radii(), cfg.top_radius))})
    k = t = 0
    size, lo = min(FIRST_LOOK, cfg.batch_size), 0.0
    while t < cfg.n:
        m = min(size, cfg.n - t)
        k, t = k + draw(m), t + m
        lo, hi = bounds(k, t, cfg.alpha * (1 - CAP_SHARE))
        if t == cfg.n:  # the cap: the fixed-n look too
            lo = cap_lower(k, t, cfg.alpha, bounds)
        if lo >= cuts[-1]:
            return k, t, lo, "radius"
        if hi < 0.5:
            return k, t, lo, "abstain"
        if not any(lo < c <= hi for c in cuts):
            return k, t, lo, "decided"
        if t < cfg.n and not reachable(k, t, cfg.n, min(c for c in cuts if c > lo), cfg.alpha, bounds):
            return k, t, lo, "reach"
        size = min(cfg.batch_size, t)
    return k, t, lo, "cap"


def reachable(k: int, t: int, n: int, cut: float, alpha: float, bounds=mixture_bounds) -> bool:
    """Whether the sequence's lower end (at its share of alpha) could still pass `cut` by the cap: at n draws with
    the share an optimistic estimate of p_A gives (the observed k/t plus REACH_Z standard errors, at least one draw's
    worth). The cap's own look is left out: counting it would send every sample near a threshold to the cap (stop
    46 measured 9,808 -> 12,724 mean draws on one row), while a sample the sequence alone sends there gets it anyway."""
    p = k / t
    hope = min(1.0, p + REACH_Z * math.sqrt(max(p * (1 - p), 1 / t) / t))
    return bounds(round(hope * n), n, alpha * (1 - CAP_SHARE))[0] >= cut


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
        c, r, _, _ = self.certify_row(x, index)
        return c, r

    def certify_row(self, x: torch.Tensor, index: int) -> tuple[int, float, int, str]:
        """(class or ABSTAIN, radius, noisy forwards spent, why it stopped): fixed-n CERTIFY or the sequential one."""
        g = self.generator(index)
        top = int(self.counts(x, self.cfg.n0, g).argmax())  # selection
        if self.cfg.sequential:  # estimation: later draws of the same stream, in growing batches
            _, t, p_lower, stop = sequential_estimate(lambda m: int(self.counts(x, m, g)[top]), self.cfg)
        else:
            k, t, stop = int(self.counts(x, self.cfg.n, g)[top]), self.cfg.n, "fixed"
            p_lower = lower_confidence_bound(k, self.cfg.n, self.cfg.alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0, self.cfg.n0 + t, stop
        return top, radius_of(p_lower, self.cfg.sigma), self.cfg.n0 + t, stop

    def predict(self, x: torch.Tensor, index: int) -> int:
        c = self.counts(x, self.cfg.n, self.generator(index))
        top2 = torch.topk(c, 2).indices.tolist() if self.n_classes > 1 else [0, 0]
        na, nb = int(c[top2[0]]), int(c[top2[1]])
        return top2[0] if binom_pvalue(na, na + nb) <= self.cfg.alpha else ABSTAIN


@dataclass
class CertifyResult:
    config: dict
    rows: list[dict] = field(default_factory=list)  # idx, label, predict, radius, correct, seconds

    def certified(self, r: float) -> int:
        """The samples certified correct at radius r."""
        return sum(1 for row in self.rows if row["correct"] and row["radius"] >= r)

    def certified_accuracy(self, r: float) -> float:
        return self.certified(r) / max(1, len(self.rows))

    def summary(self, radii: tuple[float, ...] | None = None) -> dict:
        n, cfg = len(self.rows), SmoothingConfig(**self.config)
        abstained = sum(1 for row in self.rows if row["predict"] == ABSTAIN)
        draws = sorted(int(r.get("draws", cfg.n0 + cfg.n)) for r in self.rows)  # rows of older runs: fixed n
        return {"n": n, "sigma": cfg.sigma, "n0": cfg.n0, "N": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
                "method": "sequential" if cfg.sequential else "fixed",
                "bound": f"beta-binomial mixture confidence sequence (anytime-valid) at {1 - CAP_SHARE:g} alpha, "
                         f"and Clopper-Pearson at the cap at {CAP_SHARE:g} alpha" if cfg.sequential
                else "Clopper-Pearson at n draws",
                "max_radius": round(cfg.top_radius, 4) if cfg.sequential else None,
                "clean_accuracy_smoothed": round(self.certified_accuracy(0.0), 4),
                "abstention_rate": round(abstained / max(1, n), 4),
                "certified_accuracy": {f"{r:g}": round(self.certified_accuracy(r), 4)
                                       for r in (radii or cfg.reported_radii())},
                "certified_accuracy_ci95": {f"{r:g}": [round(b, 4) for b in wilson(self.certified(r), n)]
                                            for r in (radii or cfg.reported_radii())},
                "max_certifiable_radius": round(cfg.most_certifiable(), 4),
                "draws_per_sample": {"mean": round(sum(draws) / max(1, n), 1),
                                     "median": draws[n // 2] if n else 0, "max": draws[-1] if n else 0},
                "seconds_per_image": round(sum(r["seconds"] for r in self.rows) / max(1, n), 4),
                # why samples stopped: the same key in both methods (fixed n: every sample at n draws)
                "stops": {why: sum(1 for r in self.rows if r.get("stop", "fixed") == why)
                          for why in (STOPS if cfg.sequential else ("fixed",))},
                **({"out_of_reach_z": REACH_Z, "cap_share": CAP_SHARE} if cfg.sequential else {})}

    def to_tsv(self) -> str:
        """locuslab/smoothing's columns; a sequential run adds the noisy forwards each sample took."""
        seq = bool(self.config.get("sequential"))
        lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime" + ("\tdraws" if seq else "")]
        lines += [f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.4f}\t{int(r['correct'])}\t"
                  f"{r['seconds']:.3f}" + (f"\t{r['draws']}" if seq else "") for r in self.rows]
        return "\n".join(lines) + "\n"


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SmoothingConfig, n_classes: int,
            device: torch.device, progress=None, done: list[dict] | None = None,
            on_row=None, positions: list[int] | None = None) -> CertifyResult:
    """CERTIFY every sample of (x, y), or those at `positions` (a process's shard); `done` rows (a resumed run) are
    kept and skipped. A sample's noise is seeded by its position, so a shard's rows are the whole run's."""
    res = CertifyResult(config=asdict(cfg), rows=list(done or []))
    seen = {r["idx"] for r in res.rows}
    sm = Smoothed(model, n_classes, cfg, device)
    todo = range(len(x)) if positions is None else positions
    for i in todo:
        if i in seen:
            continue
        t0 = time.time()
        c, r, draws, stop = sm.certify_row(x[i], i)
        row = {"idx": i, "label": int(y[i]), "predict": c, "radius": r, "correct": bool(c == int(y[i])),
               "seconds": time.time() - t0, "draws": draws, "stop": stop}
        res.rows.append(row)
        if on_row is not None:
            on_row(row)
        if progress:
            progress("certify", len(res.rows), len(todo), {"certified_acc_r0": res.certified_accuracy(0.0),
                                                        "draws": draws})
    res.rows.sort(key=lambda r: r["idx"])
    return res
