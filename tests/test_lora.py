"""lora patches (issue 30): low-rank weight deltas on conv and linear layers, merged into the weight when served, so
that the patched model runs the base's own multiply-adds."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hardener
from hardener.cli.app import main
from hardener.io.checkpoint import read_manifest
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import AuxBN, Lora, PatchedModel, Site
from hardener.patches.attach import carries_patches
from hardener.patches import cost as C
from hardener.patches.lora import LoraConfig

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny
from test_security import read_patched, write_patched

LAYERS = ["features.0", "features.3", "block.0", "head.3"]  # the tiny model's convs and its linear head


def _with_lora(net: nn.Module, shape: list[int], sites: list[str], rank: int = 2, seed: int = 1,
               trained: bool = True) -> PatchedModel:
    """`net` with a lora patch at each of `sites`, its factors moved off their zero start (seeded) when `trained`."""
    p = PatchedModel(Classifier(net, InputSpec(shape=shape)))
    for site in sites:
        p.attach(site, Lora.build(Site(site, p.net.get_submodule(site), []), LoraConfig(rank=rank)))
    if trained:
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in p.patches.parameters():
                t.add_(0.3 * torch.randn_like(t))
    return p.eval()


def _lora(seed: int = 1, rank: int = 2, trained: bool = True) -> PatchedModel:
    return _with_lora(trained_tiny(), [1, 8, 8], LAYERS, rank, seed, trained)


def _merged_by_hand(p: PatchedModel, strength: float = 1.0) -> nn.Module:
    """A copy of the base whose weights are W + s·B·A (an attention layer's two projections): what the patched
    model must compute, without the patches."""
    net = copy.deepcopy(p._bare_copy().net)
    with torch.no_grad():
        for site, key in p.sites.items():
            patch, layer = p.patches[key], net.get_submodule(site)
            if isinstance(layer, nn.MultiheadAttention):
                layer.in_proj_weight.add_(strength * (patch.up @ patch.down).view_as(layer.in_proj_weight))
                layer.out_proj.weight.add_(strength * (patch.up_out @ patch.down_out).view_as(layer.out_proj.weight))
            else:
                layer.weight.add_(strength * (patch.up @ patch.down).view_as(layer.weight))
    return net


def _by_hand(p: PatchedModel, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The patched model's logits computed without the patches (`_merged_by_hand`)."""
    return _merged_by_hand(p, strength)(p.model.normalise(x))


def test_a_fresh_lora_patch_is_the_base_and_strength_zero_is_the_base_exactly():
    x = torch.rand(5, 1, 8, 8)
    fresh = _lora(trained=False)
    with fresh.patches_disabled():
        base = fresh(x)
    assert torch.equal(fresh(x), base)  # B starts at zero: W + 0 is W, bit for bit
    p = _lora()
    assert not torch.equal(p(x), base)
    p.set_strength(0)
    assert torch.equal(p(x), base)
    with p.route("main"):
        p.set_strength(1)
        assert torch.equal(p(x), base)  # route main runs the base's own layers


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_computes_the_merged_weight_with_and_without_gradients(strength):
    p, x = _lora(), torch.rand(6, 1, 8, 8)
    p.set_strength(strength)
    want = _by_hand(p, x, strength)
    with torch.no_grad():
        served = p(x)  # the kept merged weight
    assert torch.allclose(served, want, atol=1e-5)
    for t in p.model.parameters():
        t.grad = None  # left by the base's own training
    live = p(x)  # grad enabled on A and B: the merge is in the forward
    assert torch.allclose(live, want, atol=1e-5)
    live.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in p.patches.parameters())
    assert all(t.grad is None for t in p.model.parameters())  # frozen means frozen


def test_the_kept_merge_follows_changes_of_the_factors_and_the_strength():
    p, x = _lora(), torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        first = p(x)
        assert torch.equal(p(x), first)
        next(iter(p.patches.values())).up.mul_(2)  # an optimiser step writes in place: a new version
        moved = p(x)
        assert not torch.equal(moved, first)
        assert torch.allclose(moved, _by_hand(p, x), atol=1e-5)
        p.set_strength(0.5)
        assert torch.allclose(p(x), _by_hand(p, x, 0.5), atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # one optimiser step, transfer recipe: what this test wants
def test_training_leaves_the_base_bit_identical_and_moves_the_factors():
    imgs, labels = make_data(n=60)
    base = trained_tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = hardener.patch(base, (imgs, labels), at="lora:auto", lora_rank=2, epochs=1, steps=1, eps=0.1, batch_size=32,
                       progress=False)
    assert sorted(m.sites) == sorted(LAYERS)
    assert all(torch.equal(v, before[k]) for k, v in m.base_state_dict().items())
    assert any(p.up.abs().sum() > 0 for p in m.patches.values())
    assert all(p.config.rank == 2 for p in m.patches.values())


def test_lora_costs_no_multiply_adds_per_image_and_counts_its_parameters():
    p = _lora(rank=3)
    base, total, per_site = C.count_macs(p)
    assert total == base and set(per_site.values()) == {0}
    # the counted twins and lora together: still the base's multiply-adds (a twin normalises; a lora merges)
    p.attach("features.1", AuxBN.from_module(p.net.get_submodule("features.1")))
    assert C.count_macs(p)[1] == base
    shapes = {s: list(p.net.get_submodule(s).weight.shape) for s in LAYERS}
    hand = sum(3 * (w[0] + torch.Size(w[1:]).numel()) for w in shapes.values())
    assert sum(t.numel() for k in LAYERS for t in p.patches[k.replace(".", "__")].parameters()) == hand
    assert all(Lora.numel({"weight_shape": shapes[s], "rank": 3}) == 3 * (shapes[s][0] + torch.Size(shapes[s][1:])
                                                                          .numel()) for s in LAYERS)
    with torch.no_grad():
        p.set_strength(1)
        assert all(t.requires_grad for t in p.patch_parameters())  # the count left them as they were


def test_a_copy_is_independent_and_computes_the_same():
    p, x = _lora(), torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = p(x)
        c = p.clone()
        assert torch.equal(c(x), want)
        next(iter(c.patches.values())).up.zero_()
        assert not torch.equal(c(x), want) and torch.equal(p(x), want)


def test_lora_round_trips_through_a_checkpoint_and_is_checked_on_loading(tmp_path):
    p, x = _lora(), torch.rand(4, 1, 8, 8)
    p.arch = ARCH
    out = tmp_path / "lora.safetensors"
    p.save(out)
    specs = read_manifest(out).patches
    assert {s["kind"] for s in specs} == {"lora"}
    assert next(s for s in specs if s["site"] == "head.3")["weight_shape"] == [3, 8]
    m = hardener.load(out, arch=ARCH)
    with torch.no_grad():
        assert torch.equal(m(x), p(x))


@pytest.mark.parametrize("edit, needles", [
    (lambda ps: ps[0].update(site="features.1"), ["lora", "features.1", "BatchNorm2d", "not a Conv1d"]),
    (lambda ps: ps[0].update(weight_shape=[9, 9, 3, 3]), ["lora", "weight of shape [9, 9, 3, 3]", "architecture"]),
    (lambda ps: ps[0].update(rank=0), ["rank", "1..4096"]),
    (lambda ps: ps[0].update(rank=3), ["features.0"]),  # the file's tensors are rank 2
])
def test_a_manifest_that_misplaces_a_lora_patch_exits_2(edit, needles, runner, tmp_path, tiny_data):
    p = _lora()
    p.arch = ARCH
    src = tmp_path / "lora.safetensors"
    p.save(src)
    manifest, tensors = read_patched(src)
    edit(manifest["patches"])  # a hostile or damaged file
    bad = write_patched(tmp_path / "edited.safetensors", manifest, tensors)
    r = runner.invoke(main, ["eval", str(bad), "--arch", ARCH, "--data", str(tiny_data), "--eps", "0.1", "--steps", "2"])
    assert_input_error(r, *needles)


@pytest.mark.parametrize("at, needles", [
    ("lora:features.1", ["lora:features.1", "BatchNorm2d", "not a Conv1d"]),
    ("lora:input", ["lora", "not at the model input"]),
])
def test_lora_at_a_layer_it_cannot_serve_exits_2(at, needles, runner, tiny_ckpt, tiny_data, tmp_path):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", at,
                             "--out", str(tmp_path / "x.safetensors"), *FAST_PATCH])
    assert_input_error(r, *needles)


def test_cli_trains_lora_beside_twins_and_a_prefilter_and_reports_its_cost(runner, tiny_ckpt, tiny_data, tmp_path):
    out, report = tmp_path / "lora.safetensors", tmp_path / "lora.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                             "--at", "prefilter:input,lora:auto", "--lora-rank", "3", "--method", "fixer,auxbn",
                             "--bn", "all", "--width", "4", "--out", str(out), "--report", str(report), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    kinds = {p["site"]: p["kind"] for p in read_manifest(out).patches}
    assert [s for s, k in kinds.items() if k == "lora"] == LAYERS
    rep = json.loads(report.read_text())
    assert rep["cost"]["macs_per_patch"]["features.0"] == 0 and rep["cost"]["macs_per_patch"]["input"] > 0
    e = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_data), "--attack", "apgd",
                             "--eps", "0.1", "--steps", "2", "--max-samples", "10"])
    assert e.exit_code == 0, e.output
    # a traced export carries the merged weight: the same graph on every call, checked in a fresh interpreter
    x = runner.invoke(main, ["export", str(out), "--arch", ARCH, "--format", "torchscript",
                             "--out", str(tmp_path / "lora.ts.pt")])
    assert x.exit_code == 0, x.output


def test_a_linear_layer_takes_the_delta_as_a_matrix():
    layer = nn.Linear(5, 4)
    patch = Lora.build(Site("fc", layer, [4]), LoraConfig(rank=2))
    with torch.no_grad():
        patch.up.normal_()
    x = torch.randn(3, 5)
    assert torch.allclose(patch(None, x, layer), F.linear(x, layer.weight + patch.up @ patch.down, layer.bias))


@pytest.mark.filterwarnings("ignore::UserWarning")  # one optimiser step: what this test wants
def test_a_budget_keeps_the_lora_deltas_and_sizes_the_rest():
    imgs, labels = make_data(n=60)
    m = hardener.patch(trained_tiny(), (imgs, labels), at="prefilter:input,lora:auto", budget=1.05, width=8,
                       epochs=1, steps=1, eps=0.1, batch_size=32, progress=False)
    kinds = {site: type(m.patches[key]).__name__ for site, key in m.sites.items()}
    assert [s for s, k in kinds.items() if k == "Lora"] == LAYERS
    assert m.cost.macs_ratio <= 1.05
    only = hardener.patch(trained_tiny(), (imgs, labels), at="lora:auto", budget=1.0, epochs=1, steps=1, eps=0.1,
                          batch_size=32, progress=False)
    assert only.cost.macs_ratio == 1.0


# ---------------------------------------------------------------- attention layers (nn.MultiheadAttention)

TV_ARCH = f"{ARCH.rsplit('/', 1)[0]}/family_models.py:tv_vit_like"


def _attention_lora(rank: int = 2, trained: bool = True) -> PatchedModel:
    import family_models as FM

    net = FM.tv_vit_like()
    sites = [n for n, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return _with_lora(net, [1, 28, 28], sites, rank, 2, trained)


def test_lora_on_attention_deltas_both_projections_served_and_trained():
    """An nn.MultiheadAttention reads its projections itself (its out_proj never runs as a layer): the patch holds a
    delta for the packed query/key/value weight and one for the output projection, and runs the layer's own forward
    on a stand-in sharing every other tensor; fresh, at strength 0 and on route main it is the base to the bit."""
    x = torch.rand(4, 1, 28, 28)
    fresh = _attention_lora(trained=False)
    assert len(fresh.sites) == 4
    with fresh.patches_disabled():
        base = fresh(x)
    with torch.no_grad():
        assert torch.equal(fresh(x), base)
    p = _attention_lora()
    for strength in (1.0, 0.5):
        p.set_strength(strength)
        want = _by_hand(p, x, strength)
        with torch.no_grad():
            assert torch.allclose(p(x), want, atol=1e-5)  # the kept merge, through the layer's fast path
        live = p(x)  # grad enabled on the factors: the merge is in the forward
        assert torch.allclose(live, want, atol=1e-5)
    live.sum().backward()
    names = {n.rsplit(".", 1)[-1] for n, t in p.patches.named_parameters() if t.grad is not None and t.grad.any()}
    assert names == {"up", "down", "up_out", "down_out"}
    assert all(t.grad is None for t in p.model.parameters())  # frozen means frozen
    p.set_strength(0)
    with torch.no_grad():
        assert torch.equal(p(x), base)
        p.set_strength(1)
        with p.route("main"):
            assert torch.equal(p(x), base)
    assert C.count_macs(p)[1] == C.count_macs(p)[0]  # merged: the base's own multiply-adds
    assert not any(isinstance(m, nn.MultiheadAttention) for q in p.patches.values() for m in q.modules())  # unsaved


def test_lora_on_attention_round_trips_and_a_manifest_of_other_shapes_is_refused(tmp_path):
    p, x = _attention_lora(), torch.rand(3, 1, 28, 28)
    out = tmp_path / "att.safetensors"
    p.save(out, arch=TV_ARCH)
    specs = read_manifest(out).patches
    assert all(s["out_shape"] == [s["weight_shape"][1]] * 2 for s in specs)
    with torch.no_grad():
        assert torch.equal(hardener.load(out, arch=TV_ARCH)(x), p(x))
    manifest, tensors = read_patched(out)
    manifest["patches"][0]["out_shape"] = [9, 9]
    write_patched(out, manifest, tensors)
    with pytest.raises(hardener.errors.InputError,
                       match=r"weights of shapes \[48, 16\] and \[9, 9\], but .* is this the architecture"):
        hardener.load(out, arch=TV_ARCH)


@pytest.mark.filterwarnings("ignore::UserWarning")  # one optimiser step on random images: what this test wants
def test_lora_auto_takes_attention_layers_trains_them_and_exports(tmp_path):
    import family_models as FM

    from hardener.io import export as X

    torch.manual_seed(0)
    imgs, labels = torch.rand(100, 1, 28, 28), torch.arange(100) % 10
    base = FM.tv_vit_like()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = hardener.patch(base, (imgs, labels), at="lora:auto", lora_rank=2, epochs=1, steps=1, eps=0.1, batch_size=50,
                       select_on=10, allow_low_accuracy=True, progress=False)
    attention = [s for s in m.sites if isinstance(m.net.get_submodule(s), nn.MultiheadAttention)]
    assert attention and all(m.patches[m.sites[s]].up_out.abs().sum() > 0 for s in attention)
    assert all(torch.equal(v, before[k]) for k, v in m.base_state_dict().items())
    X.export(m, [1, 28, 28], "torchscript", tmp_path / "m.ts.pt")  # checked in a fresh interpreter
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.ts.pt"))(imgs[:3]), m.eval()(imgs[:3]), atol=1e-5)


class _EncoderNet(nn.Module):
    """Tokens through torch's own nn.TransformerEncoderLayer (batch first: eval mode runs it as one fused kernel
    that reads its sublayers' weights itself) and an attention layer called by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 16, 4, stride=4)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        t = self.enc(self.embed(x).flatten(2).transpose(1, 2))
        t = t + self.attn(query=t, key=t, value=t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_lora_inside_a_fused_encoder_layer_and_on_attention_called_by_keyword_is_served():
    """In eval mode torch runs nn.TransformerEncoderLayer as one fused kernel that would skip the patched
    attention and linear layers: a patch inside one turns that path off, so served, trained and attacked models are
    the same; an attention layer called with query=, key=, value= keywords works on every route."""
    torch.manual_seed(0)
    p = _with_lora(_EncoderNet().eval(), [1, 8, 8], ["enc.self_attn", "enc.linear1", "attn"], seed=0)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        expected = _merged_by_hand(p).train()(p.model.normalise(x))  # (train mode: torch's unfused path; dropout 0)
        served = p(x)
        with p.patches_disabled():
            base = p(x)
    assert torch.allclose(served, expected, atol=1e-5) and not torch.allclose(served, base, atol=1e-3)
    assert torch.allclose(p(x), expected, atol=1e-5)  # with gradients: the same model
    assert not carries_patches(p._bare_copy())  # the hook that turns the fused path off stays with the patches


@pytest.mark.parametrize("layer, edit, needle", [
    ("head.3", lambda s: s.update(out_shape=[8, 8]), "weights of shapes [3, 8] and [8, 8]"),
    ("attention", lambda s: s.pop("out_shape"), "a weight of shape [48, 16]"),
])
def test_a_manifest_mixing_up_attention_and_plain_deltas_is_refused(layer, edit, needle, tmp_path):
    p = _attention_lora() if layer == "attention" else _lora()
    out = tmp_path / "m.safetensors"
    p.save(out, arch=TV_ARCH if layer == "attention" else ARCH)
    manifest, tensors = read_patched(out)
    spec = next(s for s in manifest["patches"] if layer in (s["site"], "attention"))
    edit(spec)
    write_patched(out, manifest, tensors)
    with pytest.raises(hardener.errors.InputError, match=re.escape(needle)):
        hardener.load(out, arch=TV_ARCH if layer == "attention" else ARCH)


def test_the_attention_stand_in_follows_tensors_a_load_replaces():
    p, x = _attention_lora(), torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        p(x)  # builds the stand-in
        site = next(iter(p.sites))
        layer = p.net.get_submodule(site)
        state = {k: v + 0.5 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state, assign=True)  # new tensor objects, not written in place
        assert torch.allclose(p(x), _by_hand(p, x), atol=1e-5)
