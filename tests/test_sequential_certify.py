"""Sequential certification (issue 32): an anytime-valid bound, its stopping rules, and agreement with CERTIFY."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import norm
from test_certify import Linear2

from hardener.certification.smoothing import (
    ABSTAIN,
    Smoothed,
    SmoothingConfig,
    certify,
    lower_confidence_bound,
    mixture_bounds,
    sequential_estimate,
)


def naive_bounds(k, t, alpha):
    """Clopper-Pearson recomputed at every look: valid at one fixed n, over-optimistic when looked at repeatedly."""
    return lower_confidence_bound(k, t, alpha), 1.0 - lower_confidence_bound(t - k, t, alpha)


def overstated(bounds, p: float, cfg: SmoothingConfig, samples: int = 400) -> float:
    """Share of simulated samples (top-class indicator ~ Bernoulli(p)) whose lower bound at the stop exceeds p, i.e.
    whose certified radius exceeds the true one."""
    rng = np.random.default_rng(0)
    bad = sum(sequential_estimate(lambda m: int(rng.binomial(m, p)), cfg, bounds)[2] > p for _ in range(samples))
    return bad / samples


def test_the_bound_holds_at_any_look_where_a_naive_one_does_not():
    """p_A just below the threshold of the largest radius: every look is a chance to over-state it. The confidence
    sequence stays within alpha; Clopper-Pearson at each look does not (about 0.2 at alpha 0.05)."""
    cfg = SmoothingConfig(sigma=0.5, n=5000, alpha=0.05, batch_size=500, sequential=True, max_radius=0.5)
    p = float(norm.cdf(1.0)) - 0.001  # the radius-0.5 threshold is Φ(0.5 / 0.5)
    tolerance = 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / 400)
    assert overstated(mixture_bounds, p, cfg) <= cfg.alpha
    assert overstated(naive_bounds, p, cfg) > cfg.alpha + tolerance


def test_mixture_bounds_are_an_interval_around_the_estimate_and_shrink():
    for k, t in [(0, 10), (7, 10), (10, 10), (700, 1000), (9990, 10_000)]:
        lo, hi = mixture_bounds(k, t, 0.001)
        assert 0 <= lo <= k / t <= hi <= 1
        assert lo <= lower_confidence_bound(k, t, 0.001)  # never tighter than the fixed-n bound
    assert mixture_bounds(7000, 10_000, 0.01)[1] - mixture_bounds(7000, 10_000, 0.01)[0] < \
        mixture_bounds(70, 100, 0.01)[1] - mixture_bounds(70, 100, 0.01)[0]


def linear_points(distances, w=(1.0, -2.0, 0.5, 1.0), b=-0.3):
    """Images (1x2x2) at signed distances from the hyperplane of Linear2(w, b), and their true radius and class."""
    wt = torch.tensor(w)
    base = -b * wt / wt.norm() ** 2  # on the hyperplane
    xs = torch.stack([base + d * wt / wt.norm() for d in distances]).view(-1, 1, 2, 2)
    return Linear2(list(w), b), xs, torch.tensor([int(d > 0) for d in distances])


def test_certified_radii_of_a_linear_classifier_overstate_at_most_alpha_of_the_time():
    """Closed form: g's radius is the distance to the hyperplane. Samples just inside the largest radius asked for,
    each with its own noise stream: the share of certificates above the true radius stays within alpha."""
    cfg = SmoothingConfig(sigma=0.5, n0=20, n=5000, alpha=0.05, batch_size=1000, sequential=True, max_radius=0.5)
    model, xs, ys = linear_points([0.495] * 200)
    sm = Smoothed(model, 2, cfg, torch.device("cpu"))
    rows = [sm.certify_row(x, i) for i, x in enumerate(xs)]
    over = sum(r > 0.495 for _, r, _, _ in rows) / len(rows)
    assert over <= cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / len(rows))
    assert all(c in (1, ABSTAIN) for c, _, _, _ in rows)


def test_sequential_and_fixed_n_certify_the_same_samples_at_each_radius_with_fewer_draws():
    distances = [0.1, 0.35, 0.6, 0.85, 1.6, -0.4, 0.0]  # away from the reported radii, a far one and a coin flip
    model, xs, ys = linear_points(distances)
    fixed = SmoothingConfig(sigma=0.5, n0=100, n=20_000, alpha=0.001, batch_size=2000, sequential=False)
    seq = SmoothingConfig(sigma=0.5, n0=100, n=20_000, alpha=0.001, batch_size=2000, sequential=True, max_radius=1.0)
    a = certify(model, xs, ys, fixed, 2, torch.device("cpu")).summary()
    s = certify(model, xs, ys, seq, 2, torch.device("cpu"))
    assert s.summary()["certified_accuracy"] == a["certified_accuracy"]
    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        fixed_rows = certify(model, xs, ys, fixed, 2, torch.device("cpu")).rows
        assert [f["correct"] and f["radius"] >= r for f in fixed_rows] == \
            [q["correct"] and q["radius"] >= r for q in s.rows]
        break  # the rows are deterministic: one fixed-n pass is enough for every radius below
    stops = {d: row["stop"] for d, row in zip(distances, s.rows)}
    assert stops[1.6] == "radius" and stops[0.0] in ("abstain", "reach", "cap")
    assert s.summary()["draws_per_sample"]["mean"] < a["draws_per_sample"]["mean"] / 3
    assert a["draws_per_sample"] == {"mean": 20_100.0, "median": 20_100, "max": 20_100}


def test_stopping_rules():
    cfg = SmoothingConfig(sigma=0.5, n=4000, alpha=0.01, batch_size=400, sequential=True, max_radius=0.5)
    assert sequential_estimate(lambda m: m, cfg)[3] == "radius"  # every draw the top class
    k, t, lo, stop = sequential_estimate(lambda m: 0, cfg)
    assert stop == "abstain" and t == 100 and lo == 0.0  # decided at the first look
    rng = np.random.default_rng(1)
    k, t, lo, stop = sequential_estimate(lambda m: int(rng.binomial(m, 0.75)), cfg)
    assert stop == "decided" and norm.cdf(0.5) < lo < norm.cdf(1.0)  # certifies 0.25, cannot reach 0.5
    # p_A on the threshold of radius 0.5 (Φ(1)): the cap cannot decide it; once that is clear it stops
    k, t, lo, stop = sequential_estimate(lambda m: int(rng.binomial(m, norm.cdf(1.0))), cfg)
    assert stop == "reach" and t < 4000 and lo < norm.cdf(1.0)
    draws = []
    sequential_estimate(lambda m: draws.append(m) or int(rng.binomial(m, 0.5)), replace(cfg, n=100_000))
    assert draws[:4] == [100, 100, 200, 400] and max(draws) == 400  # doubling looks, capped at batch_size
    assert sum(draws) < 50_000  # a coin flip stops long before the cap of 100,000 (1/2 out of reach)
    # ... and one just above a threshold that the cap can pass goes on until it does
    k, t, lo, stop = sequential_estimate(lambda m: int(rng.binomial(m, norm.cdf(1.0) + 0.05)), cfg)
    assert stop == "radius" and t >= 400


def test_summary_cuts_reported_radii_at_the_largest_one_asked_for():
    cfg = SmoothingConfig(sigma=0.25, sequential=True)
    assert cfg.top_radius == 0.5 and cfg.reported_radii() == (0.0, 0.25, 0.5)
    assert SmoothingConfig(sigma=0.25, sequential=False).reported_radii() == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(Exception, match="max-radius"):
        SmoothingConfig(sequential=True, max_radius=float("nan"))


def test_cli_sequential_report_states_the_method_and_draws(runner, tmp_path, tiny_ckpt, tiny_test_data):
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0",
            "20", "--n", "2000", "--alpha", "0.01", "--max-samples", "6", "--quiet"]
    from hardener.certification.run import to_markdown

    r = runner.invoke(main, [*args, "--sequential", "--max-radius", "0.2", "--report", str(tmp_path / "r.json"),
                             "--tsv", str(tmp_path / "r.tsv")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    s = rep["summary"]
    assert s["method"] == "sequential" and s["max_radius"] == 0.2 and s["alpha"] == 0.01
    assert set(s["draws_per_sample"]) == {"mean", "median", "max"} and 20 < s["draws_per_sample"]["max"] <= 2020
    assert set(s["certified_accuracy"]) == {"0", "0.25"} or set(s["certified_accuracy"]) == {"0"}
    assert "sequential" in to_markdown(rep) and "noisy forwards per sample" in r.output.lower()
    assert (tmp_path / "r.tsv").read_text().splitlines()[0].endswith("\tdraws")
    assert_input_error(runner.invoke(main, [*args, "--fixed", "--max-radius", "0.2"]), "--fixed")
    assert_input_error(runner.invoke(main, [*args, "--sequential", "--max-radius", "-1"]), "--max-radius")


def test_the_cap_look_gives_a_capped_sample_the_fixed_n_answer_and_keeps_the_guarantee(monkeypatch):
    """A sample that runs to the cap gets one Clopper-Pearson look there at CAP_SHARE of alpha (the sequence runs at
    the rest): a p_A just above a threshold that the sequence alone leaves below it is certified, as fixed n
    certifies it; and samples forced to the cap over-state p_A at most alpha of the time (union bound)."""
    import hardener.certification.smoothing as S

    cfg = SmoothingConfig(sigma=0.25, n=20_000, alpha=0.001, batch_size=2000, sequential=True, max_radius=0.5)
    cut = float(norm.cdf(0.5 / 0.25))  # the threshold of radius 0.5
    # a share at the cap whose Clopper-Pearson bound at alpha / 10 passes the cut and the sequence's does not
    k = next(k for k in range(int(cut * cfg.n), cfg.n)
             if lower_confidence_bound(k, cfg.n, cfg.alpha * S.CAP_SHARE) >= cut)
    assert mixture_bounds(k, cfg.n, cfg.alpha * (1 - S.CAP_SHARE))[0] < cut <= lower_confidence_bound(k, cfg.n,
                                                                                                       cfg.alpha)
    p = k / cfg.n
    seen = [0]

    def exact(m):  # counts that total exactly floor(t p) after t draws: no luck either way
        before, seen[0] = seen[0], seen[0] + m
        return math.floor(seen[0] * p + 1e-9) - math.floor(before * p + 1e-9)
    got_k, t, lo, stop = sequential_estimate(exact, cfg)
    assert (got_k, t, stop) == (k, cfg.n, "radius") and lo >= cut  # at the cap, radius 0.5, as fixed n certifies
    monkeypatch.setattr(S, "CAP_SHARE", 0.0)  # the sequence alone, at all of alpha
    seen[0] = 0
    assert sequential_estimate(exact, cfg)[2] < cut
    monkeypatch.setattr(S, "CAP_SHARE", 0.1)
    monkeypatch.setattr(S, "REACH_Z", 1e6)  # nothing out of reach: every sample runs to the cap
    loose = replace(cfg, n=2000, alpha=0.05, batch_size=500)
    q = float(norm.cdf(0.5 / 0.25)) - 0.002
    assert overstated(mixture_bounds, q, loose) <= loose.alpha + 3 * math.sqrt(loose.alpha * (1 - loose.alpha) / 400)
