"""Extension points: an attack, a patch kind and a training method registered from outside harden's files work
through the library and the CLI."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import hardener
from hardener import attacks as A
from hardener import methods as M
from hardener import patches as P
from hardener.cli.app import main

from conftest import ARCH, FAST_PATCH, make_data, trained_tiny


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


# ---------------------------------------------------------------- a patch kind and a training method


@dataclass
class GainConfig:
    limit: float = 2.0  # |gain| stays below this


class Gain(P.PatchKind):
    """h -> h · (1 + strength · tanh-bounded gain per channel): zero gain, so a fresh patch is the identity."""

    def __init__(self, channels: int, config: GainConfig) -> None:
        super().__init__()
        self.channels, self.config, self.strength = channels, config, 1.0
        self.gain = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self.config.limit * torch.tanh(self.gain / self.config.limit)
        return h * (1 + self.strength * g[None, :, None, None])


@dataclass
class PairingConfig:
    weight: float = 0.5


STEPS: list[str] = []  # which loss each optimiser step used


class LogitPairing(M.Method):
    """Adversarial logit pairing on patches: CE on both inputs plus the squared distance of their logits."""

    def objective(self, b: M.Batch) -> dict[str, torch.Tensor]:
        STEPS.append(self.name)
        ce_clean = torch.nn.functional.cross_entropy(b.out_clean, b.y)
        ce_adv = torch.nn.functional.cross_entropy(b.out_adv, b.y)
        pair = (b.out_clean - b.out_adv).pow(2).mean()
        return {"loss": ce_clean + ce_adv + self.options.weight * pair, "ce_clean": ce_clean, "ce_adv": ce_adv}


def _register():
    P.register_patch_kind("gain", placement="output", config_cls=GainConfig)(Gain)
    M.register_method("logit-pairing", config_cls=PairingConfig)(LogitPairing)


def test_registered_patch_kind_and_method_train_through_api_and_cli(registries, runner, tiny_ckpt, tiny_data,
                                                                     tiny_test_data, tmp_path):
    _register()
    # the library: the new kind on a named site, trained by the new method; saved and loaded back
    x, y = make_data(n=90, seed=0)
    x = x.float() / 255
    STEPS.clear()
    patched = hardener.patch(trained_tiny(), (x, y), recipe=None, method="gain,logit-pairing", at="block",
                             eps=0.1, epochs=2, steps=1, batch_size=32)
    assert [p.kind for p in patched.patches.values()] == ["gain"] and len(STEPS) == 2 * 3  # 72 images (18 held out), batch 32
    assert patched.training_record["config"]["method"] == "logit-pairing"
    assert patched.patches["block"].gain.abs().sum() > 0
    path = tmp_path / "gain.hardened.safetensors"
    patched.save(path, arch=ARCH)
    again = hardener.load(path, arch=ARCH)
    with torch.no_grad():
        assert torch.equal(again(x), patched(x))
    assert again.manifest.patches == [{"kind": "gain", "site": "block", "channels": 8, "limit": 2.0}]
    # the command line: the same names are --method choices, the checkpoint evaluates
    out = tmp_path / "cli.hardened.safetensors"
    STEPS.clear()
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--method", "logit-pairing", "--at", "gain:features,block", "--out", str(out),
                             *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert STEPS and set(STEPS) == {"logit-pairing"}
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm",
                             "--eps", "0.1", "--quiet", "--no-checks", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [p["kind"] for p in rep["patches"]] == ["gain", "fixer"]
    assert rep["training"]["config"]["method"] == "logit-pairing"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--method", "nope"])
    assert r.exit_code == 2 and "gain" in r.output and "logit-pairing" in r.output


def test_a_stored_spec_of_a_registered_kind_is_checked_before_anything_is_built(registries, tmp_path):
    from hardener.errors import InputError
    from hardener.io.manifest import validate_patch

    _register()
    assert validate_patch({"kind": "gain", "site": "block", "channels": 8}, 0, "f")["limit"] == 2.0
    with pytest.raises(InputError, match="limit"):
        validate_patch({"kind": "gain", "site": "block", "channels": 8, "limit": "big"}, 0, "f")
    with pytest.raises(InputError, match="unknown field"):
        validate_patch({"kind": "gain", "site": "block", "channels": 8, "extra": 1}, 0, "f")
    assert Gain.numel({"kind": "gain", "site": "block", "channels": 8, "limit": 2.0}) == 8
