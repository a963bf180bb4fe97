"""Our APGD against torchattacks' (the reference it reproduces), and its early stop: same verdict, less work."""
from __future__ import annotations

import pytest
import torch

from hardener import attacks as A
from hardener.attacks.apgd import apgd
from hardener.evaluation import threats as E

from conftest import make_data, trained_tiny


class Counting(torch.nn.Module):
    """Counts the samples that go through the model's forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.samples = model, 0

    def forward(self, x):
        self.samples += len(x)
        return self.model(x)


@pytest.fixture(scope="module")
def case():
    model = trained_tiny(seed=3)
    imgs, y = make_data(n=48, seed=5)
    return model, imgs.float() / 255, y


@pytest.mark.parametrize("norm,eps", [("Linf", 0.15), ("L2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_is_torchattacks_apgd_to_the_bit(case, norm, eps, loss):
    import torchattacks

    model, x, y = case
    ref = torchattacks.APGD(model, norm=norm, eps=eps, steps=12, n_restarts=2, seed=4, loss=loss)(x, y)
    ours = apgd(model, x, y, eps=eps, norm=norm, steps=12, loss=loss, restarts=2, seed=4)
    with torch.no_grad():
        broken = model(ours).argmax(1) != y
    assert 0 < int(broken.sum()) < len(y)  # some broken, some not: both paths of the code ran
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.15), ("L2", 1.0)])
def test_stop_early_gives_the_same_verdict_in_fewer_passes(case, norm, eps):
    model, x, y = case
    full, fast = Counting(model), Counting(model)
    ref = apgd(full, x, y, eps=eps, norm=norm, steps=20, loss="ce", seed=1)
    got = apgd(fast, x, y, eps=eps, norm=norm, steps=20, loss="ce", seed=1, stop_early=True)
    with torch.no_grad():
        ref_ok, got_ok = model(ref).argmax(1) == y, model(got).argmax(1) == y
    assert torch.equal(ref_ok, got_ok)
    assert 0 < int((~got_ok).sum()) < len(y)
    assert torch.equal(got[got_ok], x[got_ok])  # the survivors come back as they were (as torchattacks returns them)
    assert float((got - x).abs().flatten(1).max(1).values.max() if norm == "Linf"
                 else (got - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)
    assert fast.samples < 0.8 * full.samples


def _row_settings(result: E.ModelResult, threat: str) -> dict:
    return result.threats[threat].attacks[0].settings


def test_evaluation_stops_early_only_where_the_attacked_logits_are_the_scored_ones(case):
    model, x, y = case
    other = trained_tiny(seed=8)
    cfg = E.EvalConfig(attacks=["apgd-ce"], eps=0.15, steps=8, threats=("whitebox", "transfer"), checks=False)
    res = E.evaluate_model("patched", model, other, x, y, cfg, 3, torch.device("cpu"))
    assert _row_settings(res, "whitebox")["stop_early"] is True
    assert "stop_early" not in _row_settings(res, "transfer")  # examples of another model: kept at full strength
    low = E.EvalConfig(attacks=["apgd-ce"], eps=0.15, steps=8, threats=("whitebox",), checks=False, precision="bf16")
    res = E.evaluate_model("patched", model, None, x, y, low, 3, torch.device("cpu"))
    assert "stop_early" not in _row_settings(res, "whitebox")  # bf16 attack, fp32 score: not the same logits
    assert not E._scores_as_it_attacks(model, other, cfg, A.AttackSpec(name="apgd-ce", eps=0.1), x, torch.device("cpu"))
    assert A.AttackSpec(name="apgd-ce", eps=0.1).stop_early is False  # training and hardener.attacks.get: reference


class Noisy(torch.nn.Module):
    """A randomised defence: Gaussian noise on the input at every forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


class BatchStats(torch.nn.Module):
    """A model whose answer for a sample depends on the rest of its batch (batch statistics in eval mode)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model((x - x.mean(0, keepdim=True)) + 0.5)


def test_apgd_with_eot_on_a_randomised_model_is_torchattacks_apgd_to_the_bit(case):
    import torchattacks

    model, x, y = case
    noisy = Noisy(model).eval()
    torch.manual_seed(0)
    ref = torchattacks.APGD(noisy, eps=0.15, steps=6, seed=2, loss="dlr", eot_iter=3)(x, y)
    torch.manual_seed(0)
    assert torch.equal(ref, apgd(noisy, x, y, eps=0.15, steps=6, loss="dlr", eot=3, seed=2))


def _patched(base):
    """A pre-filter (non-trivial) and a fixer on a copy of `base` (patching hooks into the modules it is given)."""
    import copy

    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import Fixer, FixerConfig, PatchedModel, Prefilter

    torch.manual_seed(0)
    p = PatchedModel(Classifier(copy.deepcopy(base), InputSpec(shape=[1, 8, 8])))
    pre = Prefilter(1, width=4)
    torch.nn.init.normal_(pre.conv3.weight, std=0.3)  # not the identity it starts as
    p.attach("input", pre)
    p.attach("block", Fixer(8, FixerConfig()))
    return p.eval()


def test_chains_with_the_early_stop_give_the_reference_verdict_per_sample(case, monkeypatch):
    from hardener.patches.attach import StraightThrough

    base, x, y = case
    model = _patched(base)
    assert torch.equal(StraightThrough(model)(x), model(x))  # the BPDA view's forward is the model's, to the bit
    cfg = E.EvalConfig(attacks=["apgd-ce", "apgd-dlr"], eps=0.15, steps=10, threats=("whitebox", "adaptive"),
                       checks=False)
    fast = E.evaluate_model("patched", model, base, x, y, cfg, 3, torch.device("cpu"))
    assert {_row_settings(fast, t).get("stop_early") for t in ("whitebox", "adaptive")} == {True}
    monkeypatch.setattr(E, "_scores_as_it_attacks", lambda *a, **k: False)
    ref = E.evaluate_model("patched", model, base, x, y, cfg, 3, torch.device("cpu"))
    assert "stop_early" not in _row_settings(ref, "whitebox")
    assert 0 < fast.threats["whitebox"].robust["correct"] < fast.clean["correct"]
    assert fast.per_sample_broken_by == ref.per_sample_broken_by
    for t in ("whitebox", "adaptive"):
        assert torch.equal(fast.threats[t].mask, ref.threats[t].mask)


def test_no_early_stop_for_eot_randomised_or_batch_dependent_models(case):
    model, x, y = case
    cpu = torch.device("cpu")
    cfg = E.EvalConfig()
    spec = A.AttackSpec(name="apgd-ce", eps=0.1)
    assert E._scores_as_it_attacks(model, model, cfg, spec, x, cpu)
    assert not E._scores_as_it_attacks(model, model, cfg, A.AttackSpec(name="apgd-ce", eps=0.1, eot=2), x, cpu)
    noisy, pooled = Noisy(model).eval(), BatchStats(model).eval()
    assert not E._scores_as_it_attacks(noisy, noisy, cfg, spec, x, cpu)
    assert not E._scores_as_it_attacks(pooled, pooled, cfg, spec, x, cpu)
    res = E.evaluate_model("m", pooled, None, x, y, E.EvalConfig(attacks=["apgd-ce"], eps=0.15, steps=4,
                                                                 threats=("whitebox",), checks=False), 3, cpu)
    assert "stop_early" not in _row_settings(res, "whitebox")


def test_a_sample_the_score_calls_correct_is_attacked_again_without_the_stop(case):
    model, x, y = case
    ref = A.build(model, A.AttackSpec(name="apgd-ce", eps=0.15, steps=10, n_classes=3))
    xb, yb = x[:16], y[:16]
    adv = xb.clone()
    adv[:4] += 0.01  # "broken" by an early stop, says the attack; the score below calls all 16 correct
    ok = E._recheck(ref, model, xb, yb, adv, torch.ones(16, dtype=torch.bool))
    expect = ref(xb[:4], yb[:4])
    assert torch.equal(adv[:4], A.project(xb[:4], expect, 0.15, "Linf")) and torch.equal(adv[4:], xb[4:])
    with torch.no_grad():
        assert torch.equal(ok[:4], model(adv[:4]).argmax(1) == yb[:4]) and bool(ok[4:].all())
