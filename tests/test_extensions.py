"""Extension points: an attack registered from outside harden's files works through the library and the CLI."""
from __future__ import annotations

import json

import torch

import hardener
from hardener import attacks as A
from hardener.cli import main

from conftest import ARCH, make_data, trained_tiny


def _noise_attack(model, spec):
    """A (weak) query attack: the best of a few random sign perturbations, by the model's answers only."""
    g = torch.Generator().manual_seed(spec.seed)

    def run(x, y):
        best = x.clone()
        with torch.no_grad():
            for _ in range(4):
                cand = (x + spec.eps * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
                wrong = model(cand).argmax(1) != y
                best[wrong] = cand[wrong]
        return best
    return run


def _fgm2(model, spec):
    """Two steps of gradient sign: an iterative gradient attack."""
    def run(x, y):
        adv = x.clone()
        for _ in range(int(spec.steps)):
            adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(adv), y)
            (g,) = torch.autograd.grad(loss, adv)
            adv = (x + (adv.detach() + spec.eps / 2 * g.sign() - x).clamp(-spec.eps, spec.eps)).clamp(0, 1)
        return adv.detach()
    return run


def test_registered_attacks_run_by_kind_through_api_and_cli(monkeypatch, runner, patched_ckpt, tiny_test_data):
    monkeypatch.setattr(A, "REGISTRY", dict(A.REGISTRY))  # registrations end with the test
    A.register_attack("noise", kind="query", steps=0)(_noise_attack)
    A.register_attack("fgm2", kind="gradient", steps=2)(_fgm2)
    A.register_attack("fgm2-dec", kind="gradient", steps=2)(_fgm2)
    # the CLI: the query attack forms the black-box chain, the gradient one the white-box and transfer chains
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "noise,fgm2", "--eps", "0.15", "--quiet", "--no-checks", "--json",
                             "--fail-under", "robust=0.0"])
    assert r.exit_code == 0, r.output  # a registered gradient attack is strong enough for a gate
    rep = json.loads(r.stdout)
    threats = rep["models"]["patched"]["threats"]
    assert [a["attack"] for a in threats["blackbox"]["attacks"]] == ["noise"]
    assert [a["attack"] for a in threats["whitebox"]["attacks"]] == ["fgm2"]
    assert [a["attack"] for a in threats["transfer"]["attacks"]] == ["fgm2"]
    # the library
    x, y = make_data(n=30, seed=3)
    x = x.float() / 255
    net = trained_tiny()
    report = hardener.evaluate(net, (x, y), attacks="fgm2-dec,noise", eps=0.15, checks=False)
    assert report.robust is not None and report.blackbox is not None and report.transfer is None
    adv = hardener.attacks.get("fgm2", eps=0.15, n_classes=3)(net, x, y)
    assert (adv - x).abs().max() <= 0.15 + 1e-6
