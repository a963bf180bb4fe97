"""Auxiliary BNs, pre-filters, TRADES / validation selection, and the full fine-tuning methods."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hardener
from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import MANIFEST_KEY
from hardener.methods import losses
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import (
    AuxBN,
    Fixer,
    FixerConfig,
    PatchedModel,
    Prefilter,
    bn_names,
    select_bn_sites,
)
from hardener.patches.attach import Disabled
from hardener.training import fit as F

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def _model() -> PatchedModel:
    return PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))


def _with_auxbn(p: PatchedModel | None = None) -> PatchedModel:
    p = p or _model()
    for site in select_bn_sites(p.net, "all"):
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    return p


def _toy(n: int = 40, seed: int = 3) -> hdata.Dataset:
    imgs, labels = make_data(n=n, seed=seed)
    return hdata.Dataset(imgs, labels, source="toy")


def _perturb_twins(p: PatchedModel) -> None:
    with torch.no_grad():
        for patch in p.patches.values():
            if patch.kind == "auxbn":
                patch.twin.weight.mul_(1.7)
                patch.twin.running_mean.add_(0.3)


def test_route_main_and_zero_strength_reproduce_base_exactly():
    p = _with_auxbn()
    _perturb_twins(p)  # twins now differ from the base's BNs
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        with p.patches_disabled():
            base = p(x)
        with p.route("main"):
            main_route = p(x)
        adv_route = p(x)
        p.set_strength(0.0)
        zero = p(x)
    assert torch.equal(main_route, base)
    assert torch.equal(zero, base)
    assert not torch.allclose(adv_route, base)


def test_fresh_twins_reproduce_base():
    p = _with_auxbn()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        with p.patches_disabled():
            base = p(x)
        assert torch.allclose(p(x), base, atol=1e-6)


def test_auxbn_training_changes_only_twins_params_and_buffers():
    p = _with_auxbn()
    base_before = {k: v.clone() for k, v in p.base_state_dict().items()}
    twins_before = {k: v.clone() for k, v in p.patch_state_dict().items()}
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    F.fit(p, _toy(), spec, F.FitConfig(epochs=2, batch_size=16, adversary="patched", mu=0, lam=0), torch.device("cpu"))
    for k, v in p.base_state_dict().items():
        assert torch.equal(v, base_before[k]), k
    after = p.patch_state_dict()
    for suffix in ("twin.weight", "twin.bias", "twin.running_mean", "twin.running_var"):
        keys = [k for k in after if k.endswith(suffix)]
        assert keys and any(not torch.equal(after[k], twins_before[k]) for k in keys), suffix
    assert not p.model.training and not any(m.training for m in p.model.modules())


def test_bn_selection_errors():
    p = _model()
    assert select_bn_sites(p.net, "features.1") == ["features.1"]
    assert select_bn_sites(p.net, r"features\.\d") == ["features.1", "features.4"]
    assert select_bn_sites(p.net, "all") == bn_names(p.net)
    with pytest.raises(InputError, match="not a BatchNorm"):
        select_bn_sites(p.net, "features.0")
    with pytest.raises(InputError, match="matches no BatchNorm"):
        select_bn_sites(p.net, "nothing.*")
    without = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    with pytest.raises(InputError, match="no BatchNorm"):
        select_bn_sites(without, "all")
    assert select_bn_sites(without, "auto") == [] and select_bn_sites(p.net, "auto") == bn_names(p.net)


def test_vulnerability_coefficient_matches_hand_computation():
    # 3 classes; adversarial predictions: class 0 -> [0, 0, 1, 2] (half flipped), class 1 -> [1, 1]
    # (none flipped), class 2 -> [0, 2] (half flipped, into 0).
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2])
    c = losses.confusion(y, pred, 3)
    assert torch.allclose(c, torch.tensor([[0.5, 0.25, 0.25], [0, 1, 0], [0.5, 0, 0.5]], dtype=torch.float64))
    abar = losses.vulnerability_from_confusion(c)
    # alpha_k^i = 1 - C[k, i]; A_k = 1 - (sum_i alpha_k^i + sum_j alpha_j^k) / (2 (N - 1)), N = 3
    a0 = 1 - ((0.75 + 0.75) + (1.0 + 0.5)) / 4  # out of 0: C01, C02; into 0: C10, C20
    a1 = 1 - ((1.0 + 1.0) + (0.75 + 1.0)) / 4
    a2 = 1 - ((0.5 + 1.0) + (0.75 + 1.0)) / 4
    assert torch.allclose(abar, torch.tensor([a0, a1, a2]))


class _BNSpy:
    """Records the pixel value of every batch that moved a main BN's running statistics (on route adv the twin runs
    in its place: the layer is called, but does not run)."""

    def __init__(self, p: PatchedModel, bn_site: str) -> None:
        self.current = None
        self.count = 0
        self.seen: list[float] = []
        p.net.register_forward_pre_hook(lambda _m, inp: setattr(self, "current", float(inp[0].mean())))
        bn = p.net.get_submodule(bn_site)
        bn.register_forward_pre_hook(lambda m, _inp: setattr(self, "count", int(m.num_batches_tracked)))
        bn.register_forward_hook(self._hook)

    def _hook(self, module, _inp, _out):
        if int(module.num_batches_tracked) > self.count:  # a batch in training mode: its statistics moved
            self.seen.append(self.current)


@pytest.mark.parametrize("method", ["advprop", "advamd"])
def test_adversarial_batches_never_reach_main_bn_statistics(method, monkeypatch):
    """Constant images: clean = 0.3, adversarial = 0.3 + eps = 0.5, mediate = 0.3 + φ·eps = 0.4."""
    eps, phi = 0.2, 0.5
    monkeypatch.setattr(A, "build", lambda model, spec: (lambda x, y: (x + spec.eps).clamp(0, 1)))
    p = _with_auxbn(PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8], mean=[0.0], std=[1.0]))))
    spy = _BNSpy(p, "features.1")
    imgs = torch.full((32, 1, 8, 8), round(0.3 * 255), dtype=torch.uint8)
    ds = hdata.Dataset(imgs, torch.arange(32) % 3, source="const")
    clean = float(imgs[0].float().mean() / 255)
    base_bn = {k: v.clone() for k, v in p.net.get_submodule("features.1").state_dict().items()}
    F.fit(p, ds, A.AttackSpec("pgd", eps=eps, steps=1, n_classes=3),
          F.FitConfig(epochs=2, batch_size=16, method=method, phi=phi, mu=0), torch.device("cpu"))
    seen = sorted({round(v, 3) for v in spy.seen})
    expected = {"advprop": [round(clean, 3)], "advamd": [round(clean, 3), round(clean + phi * eps, 3)]}[method]
    assert seen == expected  # never clean + eps
    # and the main BN's statistics did move (it is trained, unlike a patch's base)
    after = p.net.get_submodule("features.1").state_dict()
    assert not torch.equal(after["running_mean"], base_bn["running_mean"])


def test_prefilter_starts_as_identity_and_only_goes_at_input(runner, tiny_ckpt, tiny_data, tmp_path):
    p = _model()
    p.attach("input", Prefilter(1, width=8))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        with p.patches_disabled():
            base = p(x)
        assert torch.equal(p(x), base)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "prefilter:features", "--out", str(tmp_path / "o.safetensors"), *FAST_PATCH])
    assert_input_error(r, "only at the model input")
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "input", "--out", str(tmp_path / "o.safetensors"), *FAST_PATCH])
    assert_input_error(r, "prefilter")


def test_select_on_keeps_best_validation_epoch():
    p = _model()
    p.attach("block", Fixer(8, FixerConfig()))
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    cfg = F.FitConfig(epochs=3, batch_size=16, adversary="patched", loss="trades", eps_warmup=1, select=True, mu=0)
    val = _toy(30, seed=9)
    logs = F.fit(p, _toy(), spec, cfg, torch.device("cpu"), val=val)
    assert all(e.val_robust is not None for e in logs)
    best = F.selected_epoch(logs, cfg)
    want = max(logs, key=lambda e: (e.val_robust, e.val_clean, -e.epoch))
    assert best == want.epoch
    # the kept weights are that epoch's: validating them again gives its numbers
    again = F._Validation(val, spec, 256, torch.device("cpu"), Disabled(p))(p)
    assert again == (want.val_clean, want.val_robust, want.val_transfer)


def test_validate_every_validates_every_kth_and_the_last_epoch():
    p = _model()
    p.attach("block", Fixer(8, FixerConfig()))
    spec = A.AttackSpec("pgd", eps=0.1, steps=1, n_classes=3)
    cfg = F.FitConfig(epochs=5, batch_size=16, adversary="patched", select=True, validate_every=2, mu=0)
    logs = F.fit(p, _toy(), spec, cfg, torch.device("cpu"), val=_toy(20, seed=9))
    assert [e.epoch for e in logs if e.val_robust is not None] == [2, 4, 5]
    assert F.selected_epoch(logs, cfg) in (2, 4, 5)
    with pytest.raises(InputError):
        F.FitConfig(validate_every=0)


def test_validate_every_zero_is_an_input_error(runner, tmp_path, tiny_ckpt, tiny_data):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "block", "--validate", "10", "--validate-every", "0",
                             "--out", str(tmp_path / "o.safetensors"), *FAST_PATCH])
    assert_input_error(r, "--validate-every")


def test_too_few_optimiser_steps_are_warned_about(runner, tmp_path, tiny_ckpt, tiny_data):
    rep = tmp_path / "r.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "block", "--out", str(tmp_path / "o.safetensors"), "--report", str(rep),
                             *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert "optimiser steps" in r.output and "raise --epochs" in r.output
    assert any("optimiser steps" in w for w in json.loads(rep.read_text())["data"]["warnings"])


def _cli_patch(runner, tiny_ckpt, tiny_data, out, *extra):
    return runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                                "--out", str(out), *FAST_PATCH, *extra])


def test_cli_fixer_auxbn_route_recorded_and_eval_route(runner, tiny_ckpt, tiny_data, tiny_test_data, tmp_path):
    out = tmp_path / "fa.safetensors"
    r = _cli_patch(runner, tiny_ckpt, tiny_data, out, "--method", "fixer,auxbn", "--at", "block", "--bn", "all",
                   "--adversary", "patched", "--attack", "pgd")
    assert r.exit_code == 0, r.output
    patched = hardener.load(out, arch=ARCH)
    manifest = patched.manifest
    assert manifest.route == "adv" and not manifest.base_modified
    kinds = sorted({p["kind"] for p in manifest.patches})
    assert kinds == ["auxbn", "fixer"]
    reps = {}
    for route in ("adv", "main"):
        rep = tmp_path / f"{route}.json"
        r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
                                 "--steps", "2", "--no-checks", "--threat", "whitebox", "--route", route,
                                 "--report", str(rep), "--quiet"])
        assert r.exit_code == 0, r.output
        reps[route] = json.loads(rep.read_text())
        assert reps[route]["route"] == route
    # route main skips the twins but keeps the fixer; the default (stored) route is adv
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        default = patched(x)
        with patched.route("adv"):
            adv = patched(x)
        with patched.route("main"):
            main_route = patched(x)
    assert torch.equal(default, adv) and not torch.equal(adv, main_route)


@pytest.mark.parametrize("method", ["adv-train", "advprop", "advamd"])
def test_full_methods_write_modified_base_with_parent(method, runner, tiny_ckpt, tiny_data, tiny_test_data,
                                                      tmp_path):
    out = tmp_path / f"{method}.safetensors"
    rep = tmp_path / f"{method}.json"
    r = _cli_patch(runner, tiny_ckpt, tiny_data, out, "--method", method, "--attack", "pgd", "--report", str(rep))
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    from hardener.io.checkpoint import sha256_file
    assert manifest["base_modified"] is True and manifest["parent_sha256"] == sha256_file(tiny_ckpt)
    assert manifest["route"] == ("main" if method != "adv-train" else "adv")
    report = json.loads(rep.read_text())
    assert report["base_modified"] is True
    # the base rows of the report are the parent's: its clean accuracy equals a plain eval of the parent
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
                             "--steps", "2", "--no-checks", "--quiet"])
    assert_input_error(r, "--parent")
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
                             "--steps", "2", "--no-checks", "--quiet", "--parent", str(tiny_ckpt), "--json"])
    assert r.exit_code == 0, r.output
    rep2 = json.loads(r.stdout)
    assert rep2["base_modified"] is True and "patched" in rep2["models"]
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
                             "--steps", "2", "--no-checks", "--quiet", "--json"])
    plain = json.loads(r.stdout)
    assert rep2["models"]["base"]["clean"] == plain["models"]["base"]["clean"]
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
                             "--steps", "2", "--no-checks", "--quiet", "--parent", str(out)])
    assert_input_error(r, "parent")


@pytest.mark.parametrize("args,needle", [
    (["--method", "adv-train", "--at", "block"], "--at"),
    (["--method", "adv-train,fixer"], "cannot be combined"),
    (["--method", "fixer,denoise"], "two site kinds"),
    (["--method", "bogus"], "unknown --method"),
    (["--bn", "features.0"], "not a BatchNorm"),
    (["--betas", "1,2"], "--betas"),
    (["--preset", "nope"], "--preset"),
])
def test_method_errors(args, needle, runner, tiny_ckpt, tiny_data, tmp_path):
    r = _cli_patch(runner, tiny_ckpt, tiny_data, tmp_path / "o.safetensors", *args)
    assert_input_error(r, needle)


@pytest.mark.parametrize("method,adversary,adaptive,cached", [
    ("patch", "base", False, True), ("patch", "patched", True, False),
    ("adv-train", "base", True, False), ("advprop", "base", True, False), ("advamd", "patched", False, True),
])
def test_which_adversary_each_method_uses(method, adversary, adaptive, cached):
    cfg = F.FitConfig(method=method, adversary=adversary)
    assert (cfg.adaptive, cfg.cached_adversarials) == (adaptive, cached)


def test_eval_route_and_parent_errors(runner, patched_ckpt, tiny_ckpt, tiny_test_data):
    base = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--no-checks", "--quiet"]
    assert_input_error(runner.invoke(main, [*base, "--route", "main"]), "no auxiliary BNs")
    assert_input_error(runner.invoke(main, [*base, "--parent", str(tiny_ckpt)]), "--parent applies only")


def test_at_auto_adds_the_suggested_sites(runner, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "auto.safetensors"
    r = _cli_patch(runner, tiny_ckpt, tiny_data, out, "--at", "prefilter:input,auto", "--width", "4")
    assert r.exit_code == 0, r.output
    m = hardener.load(out, arch=ARCH).manifest
    from hardener.patches.layers import probe, suggest_sites
    net = trained_tiny()
    suggested = suggest_sites(net, probe(Classifier(net, InputSpec(shape=[1, 8, 8])), torch.rand(2, 1, 8, 8)))
    assert [(p["kind"], p["site"]) for p in m.patches] == [("prefilter", "input")] + [("fixer", s) for s in suggested]


def test_preset_robust_is_its_explicit_recipe(runner, tiny_ckpt, tiny_data, tmp_path):
    """The preset names no layer: on the tiny model `stem,auto` resolve to its first site and suggested sites,
    and the file is byte-identical to spelling the recipe out."""
    fast = ["--epochs", "1", "--select-on", "10", "--eval-samples", "10", "--eval-steps", "1", "--steps", "1",
            "--batch-size", "32", "--quiet", "--eps", "0.1"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.4", *fast]
    r = runner.invoke(main, [*common, "--preset", "robust", "--out", str(a)])
    assert r.exit_code == 0, r.output
    sites = [(p["kind"], p["site"]) for p in hardener.load(a, arch=ARCH).manifest.patches]
    assert sites[0] == ("prefilter", "input") and sites[1] == ("fixer", "features")
    explicit = ["--at", ",".join(f"{k}:{s}" for k, s in sites), "--width", "64", "--rho", "1", "--adversary",
                "patched", "--attack", "pgd", "--lam", "0", "--mu", "2.5"]
    r = runner.invoke(main, [*common, *explicit, "--out", str(b)])
    assert r.exit_code == 0, r.output
    # the same tensors and the same manifest, except that the preset's file records its preset
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (hardener.load(p, arch=ARCH).manifest for p in (a, b))
    assert ma.training.pop("preset")["name"] == "robust" and mb.training.pop("preset") is None
    assert ma.to_json() == mb.to_json()
