"""Inference cost: multiply-adds counted by torch (hand counts, functional attention, the base's count) and the
measured latency of base and patched model."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import Fixer, FixerConfig, PatchedModel, Prefilter
from hardener.patches import cost as C


class SmallConv(nn.Module):
    """1x8x8 -> conv3x3(4) -> conv3x3/2(8) -> depthwise 3x3 -> pool -> linear(3)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn(self.dw(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


SMALL_CONV_MACS = 64 * 4 * 9 + 16 * 8 * (4 * 9) + 16 * 8 * 9 + 8 * 3  # c1, c2 (4x4 out), depthwise, fc


class FunctionalAttention(nn.Module):
    """Tokens from a 1x8x8 image (16 tokens of a 2x2 patch, width 8), one attention written with F.linear, matmul
    and F.scaled_dot_product_attention: no nn.Linear or nn.MultiheadAttention for a module hook to see."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(d, 4))
        self.qkv = nn.Parameter(torch.randn(3 * d, d) * 0.1)
        self.out = nn.Parameter(torch.randn(3, d))

    def forward(self, x):
        t = F.unfold(x, 2, stride=2).transpose(1, 2)  # N,16,4
        t = t @ self.embed.T  # matmul: 16*4*8
        q, k, v = F.linear(t, self.qkv).chunk(3, -1)  # 16*8*24
        heads = [z.unflatten(-1, (2, 4)).transpose(1, 2) for z in (q, k, v)]  # 2 heads of 4
        a = F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2)  # 2 * 2*16*16*4
        return F.linear(a.mean(1), self.out)  # 8*3


ATTENTION_MACS = 16 * 4 * 8 + 16 * 8 * 24 + 2 * (2 * 16 * 16 * 4) + 8 * 3


class MHA(nn.Module):
    """nn.MultiheadAttention over 16 tokens of width 8: under no_grad in eval mode it may take a fused fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(F.unfold(x, 2, stride=2).transpose(1, 2))
        return self.fc(self.attn(t, t, t, need_weights=False)[0].mean(1))


MHA_MACS = 16 * 4 * 8 + 16 * 8 * 24 + 2 * 16 * 16 * 8 + 16 * 8 * 8 + 8 * 3  # embed, in_proj, QK^T and AV, out_proj, fc


def _patched(net: nn.Module) -> PatchedModel:
    spec = InputSpec(mean=[0.5], std=[0.25], shape=[1, 8, 8])
    return PatchedModel(Classifier(net.eval(), spec))


def test_counter_agrees_with_a_hand_count_on_a_small_conv_net():
    assert C.module_macs(SmallConv(), [1, 8, 8]) == SMALL_CONV_MACS


def test_functional_attention_is_counted_as_torch_counts_it_and_by_hand():
    m = FunctionalAttention()
    assert C.module_macs(m, [1, 8, 8]) == ATTENTION_MACS
    x = torch.rand(1, 1, 8, 8)
    with C.counter() as fc:  # torch's FlopCounterMode (with the CPU SDPA kernel's formula)
        m(x)
    assert fc.get_total_flops() == 2 * ATTENTION_MACS


def test_multihead_attention_counts_the_same_in_train_and_eval_and_under_no_grad():
    m = MHA()
    x = torch.rand(1, 1, 8, 8)
    assert C.module_macs(m, [1, 8, 8]) == MHA_MACS
    m.train()
    assert C.macs(m, x) == MHA_MACS and m.training
    with torch.no_grad():  # the count enables grad itself: no fast path hides the attention
        assert C.macs(m.eval(), x) == MHA_MACS


def test_base_count_is_the_unpatched_model_and_each_patch_is_counted():
    net = SmallConv()
    p = _patched(net)
    fresh = C.count(p)
    assert fresh.macs_base == fresh.macs_patched == C.module_macs(SmallConv().eval(), [1, 8, 8]) == SMALL_CONV_MACS
    assert fresh.macs_ratio == 1.0 and fresh.macs_per_patch == {}
    p.attach("c2", Fixer(8, FixerConfig(rho=4)))  # 4x4 map: 1x1 8->2, 3x3 2->8
    p.attach("input", Prefilter(1, width=4))  # 8x8: 1->4, 4->4, 4->1, all 3x3
    got = C.count(p)
    fixer, pre = 16 * (8 * 2 + 2 * 8 * 9), 64 * 9 * (4 + 16 + 4)
    assert got.macs_per_patch == {"c2": fixer, "input": pre}
    assert got.macs_base == SMALL_CONV_MACS and got.macs_patched == SMALL_CONV_MACS + fixer + pre
    assert got.parameters_patches == sum(t.numel() for t in p.patch_parameters())
    with torch.no_grad(), p.patches_disabled():
        assert C.count(p).macs_patched == SMALL_CONV_MACS  # what the base runs, patches switched off
    j = got.to_dict()
    assert j == got.to_json()  # the older name
    assert j["macs_ratio"] == round(got.macs_patched / SMALL_CONV_MACS, 4) and j["latency_ratio"] is None


def test_latency_is_measured_for_base_and_patched_at_each_batch():
    p = _patched(SmallConv())
    p.attach("input", Prefilter(1, width=64))
    lat = C.measure_latency(p, batches=(1, 64), budget_s=0.3)
    large = max(int(b) for b in lat["batches"])  # 64, or halved to fit the budget on a busy machine
    assert set(lat["batches"]) == {"1", str(large)} and 1 < large <= 64 and lat["threads"] == torch.get_num_threads()
    for b in lat["batches"].values():
        assert b["base_ms"] > 0 and b["patched_ms"] > 0 and b["repeats"] >= C.MIN_REPEATS
        assert abs(b["ratio"] - b["patched_ms"] / b["base_ms"]) < 0.01 * b["ratio"]
    cost = C.count(p)
    cost.latency = lat
    # a 64-wide full-resolution pre-filter is most of this model's work: slower than the base
    assert cost.latency_ratio == max(b["ratio"] for b in lat["batches"].values()) and cost.latency_ratio > 1
    assert not p.training


def test_latency_halves_a_batch_that_runs_out_of_memory():
    """A large batch that does not fit (a big model on a small GPU) is timed at the largest half that does; one image
    that does not fit is the caller's error (an evaluation then keeps its report without the latency)."""
    class Cramped(nn.Module):
        def __init__(self, most: int) -> None:
            super().__init__()
            self.most, self.seen = most, []

        def forward(self, x):
            self.seen.append(x.shape[0])
            if x.shape[0] > self.most:
                raise torch.OutOfMemoryError(f"CUDA out of memory: batch {x.shape[0]}")
            return x

    cramped = Cramped(16)
    p = _patched(nn.Sequential(cramped, SmallConv()))
    p.attach("input", Prefilter(1, width=4))
    lat = C.measure_latency(p, batches=(256,), budget_s=0.5)
    (b, got), = lat["batches"].items()
    assert 1 < int(b) <= 16 and got["repeats"] >= C.MIN_REPEATS  # 16, or halved again on a busy machine
    assert cramped.seen[:5] == [256, 128, 64, 32, 16]
    p = _patched(nn.Sequential(Cramped(0), SmallConv()))
    try:
        C.measure_latency(p, batches=(1,), budget_s=0.1)
        raise AssertionError("one image out of memory was not raised")
    except torch.OutOfMemoryError:
        assert not p.training


def test_latency_that_varies_between_repeats_is_marked_noisy():
    """A busy machine makes repeats disagree: a patch whose time swings between repeats (a stand-in for another job
    on the cores) is marked noisy, per batch and as a whole, and the line says so; one that costs the same each time
    is not. The base and the patches sleep, so the ratios are set by the sleeps, not by this machine's load."""
    import itertools

    class Sleeping(nn.Module):
        def __init__(self, *seconds: float) -> None:
            super().__init__()
            self.turns = itertools.cycle(seconds)

        def forward(self, x):
            time.sleep(next(self.turns))
            return x

    def measured(*patch_seconds: float):
        p = _patched(nn.Sequential(Sleeping(0.05), SmallConv()))
        p.attach("input", Sleeping(*patch_seconds))
        cost = C.count(p)
        cost.latency = C.measure_latency(p, batches=(1,), budget_s=1.2)
        return cost
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny convolution in microseconds, whatever else runs on the cores
    try:
        swinging, steady = measured(0.0, 0.15), measured(0.05)
    finally:
        torch.set_num_threads(threads)
    b = swinging.latency["batches"]["1"]
    assert b["noisy"] and b["spread"] > C.NOISY_SPREAD
    assert swinging.latency["noisy"] and "quiet" in swinging.latency["noisy_note"]
    assert "noisy: the repeats' ratios spread" in C.describe_latency(swinging)
    s = steady.latency["batches"]["1"]
    assert not s["noisy"] and not steady.latency["noisy"] and "noisy_note" not in steady.latency
    assert 1.5 < s["ratio"] < 2.5 and "noisy" not in C.describe_latency(steady)


# ---------------------------------------------------------------- the plan, the manifest, the report, the library


def test_patch_states_cost_and_manifest_and_report_carry_it(runner, tmp_path, tiny_ckpt, tiny_data):
    import json

    from hardener.cli.app import main
    from hardener.io.checkpoint import load_patched, read_manifest

    from conftest import ARCH

    out, rep = tmp_path / "p.safetensors", tmp_path / "r.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--preset", "robust",
                             "--epochs", "1", "--steps", "1", "--eval-samples", "10", "--eval-steps", "1",
                             "--width", "4", "--select-on", "0", "--batch-size", "64", "--out", str(out),
                             "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "cost: the patched model at " in r.stderr and "x the base's multiply-adds per image" in r.stderr
    plan = r.stderr[r.stderr.index("plan: "):]
    assert "x the base's multiply-adds per image" in plan and "; latency batch 1 " in plan  # said before training
    assert plan.index("; latency batch 1 ") < plan.index("train 1/")
    manifest = read_manifest(out).cost
    report = json.loads(rep.read_text())["cost"]
    patched = load_patched(out, arch=ARCH)[0]
    counted = C.count(patched)
    for c in (manifest, report):
        assert c["macs_ratio"] == round(counted.macs_ratio, 4) and c["macs_ratio"] > 1
        assert c["macs_base"] == counted.macs_base and c["macs_per_patch"] == counted.macs_per_patch
    # the measured latency is the run's (the report's); the checkpoint keeps the same bytes for the same seed
    assert report["latency_ratio"] > 0 and set(report["latency"]["batches"]) <= {str(b) for b in range(1, 257)}
    assert report["latency"]["threads"] >= 1 and report["latency"]["device"] == "cpu"
    assert manifest == {k: v for k, v in report.items() if not k.startswith("latency")}
    assert manifest["budget"] is None and "sizing" not in manifest  # unconstrained: nothing was sized
    md = tmp_path / "eval.md"
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_data), "--max-samples", "8",
                             "--steps", "1", "--eps", "0.1", "--json", "--report", str(md)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["cost"]  # harden eval counts the cost and times it on the machine it runs on
    assert {k: v for k, v in got.items() if not k.startswith("latency")} == manifest
    assert got["latency_ratio"] > 0 and got["latency"]["device"] == "cpu" and "1" in got["latency"]["batches"]
    assert "Inference cost: " in r.stderr and "x the base's multiply-adds per image" in r.stderr
    line = next(ln for ln in md.read_text().splitlines() if ln.startswith("Inference cost: "))
    assert f"{manifest['macs_ratio']:.2f}x the base's multiply-adds" in line and "latency batch 1 " in line


def test_library_patch_carries_the_cost_into_the_checkpoint(tmp_path, monkeypatch):
    import hardener
    from hardener.io.checkpoint import read_manifest

    from conftest import make_data, trained_tiny

    imgs, labels = make_data(n=60)
    patched = hardener.patch(trained_tiny(), (imgs.float() / 255, labels), eps=0.1, epochs=1, steps=1, batch_size=32,
                             width=4)
    assert patched.cost.macs_ratio == C.count(patched).macs_ratio > 1 and patched.cost.latency_ratio > 0
    patched.save(tmp_path / "p.safetensors")
    got = read_manifest(tmp_path / "p.safetensors").cost
    assert got == patched.cost.to_json(latency=False) and got["macs_ratio"] == round(patched.cost.macs_ratio, 4)
    rep = hardener.evaluate(patched, (imgs[:8].float() / 255, labels[:8]), "apgd-ce", eps=0.1, steps=1, checks=False,
                            progress=False)
    cost = rep.to_dict()["cost"]  # the library's evaluation measures it too, on the machine it runs on
    assert cost["macs_ratio"] == got["macs_ratio"] and cost["latency_ratio"] > 0 and cost["budget"] is None
    assert "Inference cost: " in rep.to_markdown()
    plain = hardener.evaluate(trained_tiny(), (imgs[:8].float() / 255, labels[:8]), "apgd-ce", eps=0.1, steps=1,
                              checks=False, progress=False)
    assert "cost" not in plain.to_dict() and "Inference cost" not in plain.to_markdown()  # no patches, no cost

    def broken(*a, **k):
        raise RuntimeError("a patch that cannot be timed\nsecond line")
    monkeypatch.setattr(C, "measure", broken)  # the measurement is an extra: the finished evaluation keeps its report
    rep = hardener.evaluate(patched, (imgs[:8].float() / 255, labels[:8]), "apgd-ce", eps=0.1, steps=1, checks=False,
                            progress=False)
    assert rep.clean is not None and "cost" not in rep.to_dict()
    assert "the inference cost was not measured after the attacks (RuntimeError: a patch that cannot be timed)" in \
        rep.to_dict()["data"]["warnings"]


def test_layers_shows_what_a_fixer_would_cost_at_each_site(runner, tiny_ckpt):
    import json

    from hardener.cli.app import main

    from conftest import ARCH

    r = runner.invoke(main, ["layers", str(tiny_ckpt), "--arch", ARCH, "--input-shape", "1,8,8", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    fix = {lay["name"]: lay["fixer_macs"] for lay in got["layers"]}
    # at the default recipe's sizes (`--preset robust`: rho 1, a width-64 pre-filter), which it records
    assert got["recipe"] == {"preset": "robust", "rho": 1.0, "width": 64}
    assert fix["block"] == 16 * (8 * 8 + 8 * 8 * 9)  # 8 channels at 4x4: 1x1 8->8, 3x3 8->8
    assert got["prefilter_macs"] == 64 * (9 * 64 + 9 * 64 * 64 + 9 * 64)  # 1x8x8: 3x3 1->64, 64->64, 64->1
    assert all((v is None) == (not lay["site"]) for lay, v in zip(got["layers"], fix.values()))
    assert got["base_macs"] > 0
    r = runner.invoke(main, ["layers", str(tiny_ckpt), "--arch", ARCH, "--input-shape", "1,8,8"])
    assert r.exit_code == 0 and "a fixer of the default recipe (--rho 1)" in r.stderr
    assert "pre-filter at the input (the default recipe's, --width 64): 2.43M" in r.stderr


# ---------------------------------------------------------------- light pre-filter designs


import pytest  # noqa: E402

from hardener.errors import InputError  # noqa: E402
from hardener.patches import PrefilterConfig, Site  # noqa: E402


@pytest.mark.parametrize("design,stride,size", [("plain", 1, 8), ("separable", 1, 8), ("separable", 2, 9),
                                                ("shuffle", 2, 8), ("shuffle", 2, 9), ("shuffle", 3, 8)])
def test_prefilter_designs_start_as_the_identity_and_round_trip(design, stride, size):
    from hardener.patches import Prefilter as P

    torch.manual_seed(0)
    p = _patched(SmallConv())
    p.model.spec.shape = [1, size, size]
    x = torch.rand(4, 1, size, size)
    with torch.no_grad():
        base = p(x)
    cfg = P.make_config({"width": 8, "prefilter_stride": stride, "prefilter_design": design})
    pf = P.build(Site("input", p.net, [1, size, size]), cfg)
    p.attach("input", pf)
    with torch.no_grad():
        assert torch.equal(p(x), base)  # zero-initialised last conv: exactly the base
    spec = pf.extra_spec()
    assert ("design" in spec) == (design != "plain") and P.may_mask
    assert P.numel({"site": "input", **spec}) == sum(t.numel() for t in pf.parameters())
    again = P.from_spec(spec)
    again.load_state_dict(pf.state_dict())  # same tensors, same names
    torch.nn.init.normal_(pf.conv3.weight, std=0.1)
    again.load_state_dict(pf.state_dict())
    with torch.no_grad():
        out = pf(x)
        assert out.shape == x.shape and not torch.equal(out, x) and torch.equal(again(x), out)
    if design != "plain":  # lighter than the plain pre-filter of the same width (and stride: separable; shuffle
        # costs what a strided plain one does, its last conv at 1/s with C*s^2 outputs, and learns its upsampling)
        plain = P(1, 8, stride=stride if design == "separable" else 1)
        assert C.module_macs(pf, [1, size, size]) < C.module_macs(plain, [1, size, size])


def test_prefilter_design_hand_counts_and_bad_values():
    from hardener.patches import Prefilter as P

    c, w = 1, 8
    assert C.module_macs(P(c, w, design="separable"), [1, 8, 8]) == 64 * (c * w * 9 + w * 9 + w * w + w * c * 9)
    # shuffle, s=2: three convs on 4x4, the last with c*4 outputs
    assert C.module_macs(P(c, w, stride=2, design="shuffle"), [1, 8, 8]) == 16 * (c * w * 9 + w * w * 9 + w * 4 * c * 9)
    with pytest.raises(InputError, match="prefilter-stride 2 or more"):
        PrefilterConfig(design="shuffle")
    with pytest.raises(InputError, match="prefilter-design must be one of"):
        PrefilterConfig(design="fancy")


def test_cli_trains_a_shuffle_prefilter_and_loads_it(runner, tmp_path, tiny_ckpt, tiny_data):
    from hardener.cli.app import main
    from hardener.io.checkpoint import load_patched

    from conftest import ARCH, FAST_PATCH

    out = tmp_path / "p.safetensors"
    args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "prefilter:input",
            "--width", "4", "--out", str(out), *FAST_PATCH]
    r = runner.invoke(main, [*args, "--prefilter-design", "shuffle"])
    assert r.exit_code == 2 and "--prefilter-stride 2 or more" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, [*args, "--prefilter-design", "shuffle", "--prefilter-stride", "2"])
    assert r.exit_code == 0, r.output
    patched, manifest = load_patched(out, arch=ARCH)
    assert manifest.patches[0]["design"] == "shuffle" and manifest.patches[0]["stride"] == 2
    assert patched.patches["input"].conv3.out_channels == 4


# ---------------------------------------------------------------- --budget


def _robust_on_tiny(**overrides):
    from hardener import api
    from hardener.training import steps

    import tiny_model
    from conftest import make_data

    imgs, labels = make_data(n=30)
    torch.manual_seed(0)
    p = api.as_patched(tiny_model.tiny(), mean=[0.5], std=[0.25])  # multiply-adds do not depend on the weights
    infos = api.finish(p, api.as_dataset((imgs, labels)), torch.device("cpu"))
    opts, _ = api.PatchOptions.build("robust", overrides)
    notes = []
    steps.attach_patches(p, infos, opts, say=notes.append)
    return p, notes


@pytest.mark.parametrize("budget", [1.1, 1.5, 3.0])
def test_a_budget_sizes_the_recipe_to_fit(budget):
    free, _ = _robust_on_tiny()
    p, notes = _robust_on_tiny(budget=budget)
    got = C.count(p)
    assert got.macs_ratio <= budget < C.count(free).macs_ratio  # the robust recipe is ~150x this tiny base
    assert notes[-1].startswith(f"--budget {budget:g}: ") and f"{got.macs_ratio:.3f}x the base's" in notes[-1]
    # 3x: a lighter pre-filter, at a width between the ladder's halvings (the widest that fits), and fixers
    assert p.sites and (budget < 3 or ("input" in p.sites and len(p.sites) == 3
                                       and "pre-filter width 12," in notes[-1]))
    with torch.no_grad():  # still the identity at the start
        x = torch.rand(3, 1, 8, 8)
        with p.patches_disabled():
            base = p(x)
        assert torch.equal(p(x), base)


def test_a_budget_names_the_fixers_it_squeezed_thin():
    """The pre-filter is sized first, so a larger budget can buy a wider one and leave thinner fixers (12x: width 16,
    rho 4; 6x: width 8, rho 1): the sizing line names fixers left with fewer than MIN_HIDDEN hidden channels."""
    roomy, thin = (_robust_on_tiny(budget=b)[1][-1] for b in (6, 12))
    assert "--rho 1 at" in roomy and "thin" not in roomy
    assert "--rho 4 at" in thin and "(thin: hidden channels 2 at features, 2 at features.3, 2 at block;" in thin


def test_a_generous_budget_keeps_the_recipe_and_none_is_unconstrained():
    free, _ = _robust_on_tiny()
    for budget in (1000.0, "none", None):
        p, notes = _robust_on_tiny(budget=budget)
        assert p.patch_specs() == free.patch_specs()
        assert bool(notes and notes[-1].startswith("--budget")) == (budget == 1000.0)


@pytest.mark.parametrize("budget,says", [("0.9", "at least 1.0x"), ("1.0", "no patch of the recipe fits"),
                                         ("1.0001", "fits in 0.01% of the base's"), ("lots", "must be a number")])
def test_an_impossible_budget_exits_2_with_one_line(runner, tmp_path, tiny_ckpt, tiny_data, budget, says):
    from hardener.cli.app import main

    from conftest import ARCH

    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--budget", budget,
                             "--out", str(tmp_path / "p.safetensors"), "--epochs", "1", "--quiet"])
    assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("Error: --budget")


def test_budget_from_harden_toml(runner, tmp_path, tiny_ckpt, tiny_data):
    from hardener.cli.app import main

    from conftest import ARCH

    cfg = tmp_path / "harden.toml"
    cfg.write_text("[patch]\nbudget = 0.5\n")
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--config", str(cfg),
                             "--out", str(tmp_path / "p.safetensors"), "--quiet"])
    assert r.exit_code == 2 and "--budget must be 1.0 or more, or none, got 0.5" in r.stderr
    assert "at least 1.0x" in r.stderr


def test_a_budget_nothing_fits_names_the_least_that_does(runner, tmp_path, tiny_ckpt, tiny_data):
    """The refusal names the smallest budget that fits the cheapest patch, and that budget does fit."""
    import re

    import hardener

    from hardener.cli.app import main
    from hardener.io.checkpoint import read_manifest

    from conftest import ARCH

    def run(budget: str):
        return runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--budget",
                                    budget, "--out", str(tmp_path / f"p{budget}.safetensors"), "--epochs", "1",
                                    "--quiet", "--allow-low-accuracy"])
    r = run("1.0001")
    least = re.search(r"--budget (\d+\.\d\d) or more fits it", r.stderr)
    assert r.exit_code == 2 and least, r.stderr
    ok = run(least.group(1))
    assert ok.exit_code == 0, ok.output
    path = tmp_path / f"p{least.group(1)}.safetensors"
    assert read_manifest(path).cost["macs_ratio"] <= float(least.group(1))
    rep = hardener.evaluate(str(path), str(tiny_data), "apgd-ce", arch=ARCH, eps=0.1, steps=1, max_samples=8,
                            checks=False, progress=False)  # the library reads the budget from the file's manifest
    assert rep.to_dict()["cost"]["budget"] == float(least.group(1)) and "sized to a budget of" in rep.to_markdown()


# ---------------------------------------------------------------- low-rank fixers


def test_a_low_rank_fixer_starts_as_the_identity_costs_less_and_round_trips():
    p = _patched(SmallConv())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        base = p(x)
    full, low = Fixer(8, FixerConfig(rho=1)), Fixer(8, FixerConfig(rho=1, rank=2))
    assert "rank" not in full.extra_spec() and low.extra_spec()["rank"] == 2  # earlier checkpoints read the same
    p.attach("c2", low)
    with torch.no_grad():
        assert torch.equal(p(x), base)
    # 4x4 map, hidden 8: 1x1 8->8, then 3x3 8->2 and 1x1 2->8 instead of 3x3 8->8
    assert C.count(p).macs_per_patch == {"c2": 16 * (8 * 8 + 8 * 2 * 9 + 2 * 8)}
    assert C.module_macs(full, [8, 4, 4]) == 16 * (8 * 8 + 8 * 8 * 9)
    spec = {"site": "c2", **low.extra_spec()}
    assert Fixer.numel(spec) == sum(t.numel() for t in low.parameters())
    again = Fixer.from_spec(spec)
    torch.nn.init.normal_(low.conv2_up.weight)
    again.load_state_dict(low.state_dict())
    h = torch.rand(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(again(h), low(h)) and not torch.equal(low(h), h)
    with pytest.raises(InputError, match="fixer-rank"):
        FixerConfig(rank=-1)
    from hardener.patches import TokenFixer
    with pytest.raises(InputError, match="holds tokens"):
        TokenFixer.build(Site("enc", None, [5, 8]), FixerConfig(rank=2))
    assert "rank" not in TokenFixer(8, FixerConfig()).extra_spec()


def test_a_latency_past_the_budget_is_a_warning_in_each_face(monkeypatch, runner, tmp_path, tiny_ckpt, tiny_data):
    """`--budget` counts multiply-adds; the plan then times the patched model, and a latency past the budget is a
    warning before any training: `budget=` at the caller's line from the library, `--budget` on stderr from the
    command line (the timing is replaced by a slow one here; `measure_latency` itself is tested above)."""
    import warnings

    import hardener
    from hardener.cli.app import main

    from conftest import ARCH, FAST_PATCH, make_data, trained_tiny

    slow = {"device": "cpu", "threads": 1, "batches": {"1": {"ratio": 150.0, "base_ms": 1.0, "patched_ms": 150.0}}}
    monkeypatch.setattr(C, "measure_latency", lambda *a, **k: slow)
    imgs, labels = make_data(n=60)
    first_step: list = []  # the warnings given when training's first step is shown: the latency one is among them
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = hardener.patch(trained_tiny(), (imgs.float() / 255, labels), eps=0.1, epochs=1, steps=1, batch_size=32,
                           budget=100, progress=lambda *a: first_step or first_step.append(list(seen)))
    assert any("latency" in str(w.message) for w in first_step[0])
    over = [w for w in seen if "latency" in str(w.message)]
    assert p.cost.macs_ratio <= 100 and len(over) == 1, [str(w.message) for w in seen]
    assert "fits budget=100" in str(over[0].message) and "150.00x" in str(over[0].message)
    assert "--" not in str(over[0].message) and over[0].filename == __file__
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "block",
                             "--budget", "100", "--out", str(tmp_path / "p.safetensors"), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert "fits --budget 100 in multiply-adds" in r.stderr and "150.00x the base's latency" in r.stderr
    monkeypatch.setattr(C, "measure_latency", lambda *a, **k: {**slow, "batches": {"1": {**slow["batches"]["1"],
                                                                                             "ratio": 1.1}}})
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "block",
                             "--budget", "100", "--out", str(tmp_path / "q.safetensors"), *FAST_PATCH])
    assert r.exit_code == 0 and "latency here" not in r.stderr, r.output
