"""Our APGD against torchattacks' (the reference it reproduces), and its early stop: same verdict, less work."""
from __future__ import annotations

import pytest
import torch

from hardener import attacks as A
from hardener import evaluation as E
from hardener.apgd import apgd

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


def _row_settings(result: dict, threat: str) -> dict:
    return result["threats"][threat]["attacks"][0]["settings"]


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
    assert not E._scores_as_it_attacks(model, other, cfg)
    assert A.AttackSpec(name="apgd-ce", eps=0.1).stop_early is False  # training and hardener.attacks.get: reference
