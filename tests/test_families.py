"""Issue 21, item 0: correct on every family — BN twins of activation-fused BNs, site discovery on timm and
torchvision layouts, the preset's cost on features-style models, output size against the data's classes. The models
mimic those families' structure (tests/family_models.py); no torchvision or timm needed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hardener
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import AuxBN, PatchedModel, select_bn_sites

import family_models as FM
from conftest import HERE

FAMILY_FILE = HERE / "family_models.py"


def _patched(net: torch.nn.Module, size: int = 32) -> PatchedModel:
    return PatchedModel(Classifier(net, InputSpec(shape=[3, size, size])))


def _rgb_data(tmp_path, n: int = 24, classes: int = 10, size: int = 32, names: list[str] | None = None):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, size, size, generator=g) * 255).round().to(torch.uint8)
    path = tmp_path / "rgb.npz"
    extra = {"classes": np.array(names)} if names is not None else {}
    np.savez(path, images=x.numpy(), labels=(torch.arange(n) % classes).numpy(), **extra)
    return path


def _attach(net, data, recipe=None, **options):
    """What `harden patch` attaches (sites resolved on a dry run), without training; with what it said."""
    from hardener import api
    from hardener.training import steps

    patched = api.as_patched(net)
    infos = api.finish(patched, api.as_dataset(str(data)), torch.device("cpu"))
    opts, _ = api.PatchOptions.build(recipe, options)
    notes: list[str] = []
    steps.attach_patches(patched, infos, opts, say=notes.append)
    return patched, notes


# ---------------------------------------------------------------- BN twins of activation-fused BNs


def test_twins_of_activation_fused_bns_reproduce_the_base_exactly():
    p = _patched(FM.efficientnet_like())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        base = p(x)
    for site in select_bn_sites(p.net, "all"):
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    twins = [p.patches[k].twin for k in p.sites.values()]
    assert any(isinstance(t.act, torch.nn.SiLU) for t in twins) and any(isinstance(t.act, torch.nn.Identity)
                                                                         for t in twins)
    assert all(type(t) is FM.BatchNormAct2d and all(q.requires_grad for q in t.parameters()) for t in twins)
    with torch.no_grad():
        assert torch.equal(p(x), base)  # route adv: every BN's output comes from its twin
        with p.route("main"):
            assert torch.equal(p(x), base)


def test_twins_of_activation_fused_bns_save_and_reload(tmp_path):
    arch = f"{FAMILY_FILE}:efficientnet_like"
    p = _patched(FM.efficientnet_like())
    for site in select_bn_sites(p.net, "all"):
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    with torch.no_grad():  # trained twins: their own statistics and scales
        for patch in p.patches.values():
            patch.twin.weight.mul_(1.3)
            patch.twin.running_mean.add_(0.1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = p(x)
    p.save(tmp_path / "m.safetensors", arch=arch)
    again = hardener.load(tmp_path / "m.safetensors", arch=arch).eval()
    assert {s["type"] for s in again.manifest.patches} == {"BatchNormAct2d"}
    with torch.no_grad():
        assert torch.equal(again(x), want)


def test_a_twin_is_rebuilt_only_from_the_recorded_class_at_its_site(tmp_path):
    """The manifest's class name is checked against the base's layer, never used to find code."""
    from hardener.errors import InputError

    spec = {"kind": "auxbn", "site": "bn1", "type": "BatchNorm2d", "features": 8, "eps": 1e-5, "momentum": 0.1,
            "affine": True}
    bn1 = FM.efficientnet_like().bn1
    with pytest.raises(InputError, match="BatchNormAct2d"):
        AuxBN.restore(spec, bn1)
    assert type(AuxBN.restore({**spec, "type": "BatchNormAct2d"}, bn1).twin) is FM.BatchNormAct2d
    with pytest.raises(InputError, match="rebuilt from the base's own layer"):
        AuxBN.from_spec({**spec, "type": "os.system"})
def test_fixer_and_auto_twins_on_an_efficientnet_layout(tmp_path):
    """`--method fixer,auxbn --bn auto`: the suggested fixer sites are never BN layers, so every BN gets its twin,
    and the patched model starts equal to the base."""
    net = FM.efficientnet_like()
    data = _rgb_data(tmp_path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        base = net(x)
    patched, notes = _attach(net, data, method="fixer,auxbn", bn="auto")
    bns = set(select_bn_sites(patched.net, "all"))
    kinds = {s: patched.patches[k].kind for s, k in patched.sites.items()}
    assert {s for s, k in kinds.items() if k == "auxbn"} == bns
    assert not {s for s, k in kinds.items() if k == "fixer"} & bns
    with torch.no_grad():
        assert torch.equal(patched.eval()(x), base)


# ---------------------------------------------------------------- site discovery


def _infos(net, size: int = 32, channels: int = 3):
    from hardener.patches.layers import probe

    return probe(Classifier(net, InputSpec(shape=[channels, size, size])), torch.rand(2, channels, size, size))


# what the probe saw suggested (stems, whole trunks) and the stems `--at stem` must not grow into
NEVER = {"efficientnet": {"conv_stem", "bn1", "blocks"}, "convnext": {"stem", "stages"},
         "tv_convnext": {"features", "features.0"}, "mobilenet": {"features", "features.0"}}
STEMS = {"efficientnet": "conv_stem", "convnext": "stem", "tv_convnext": "features.0", "mobilenet": "features.0",
         "vit": "patch_embed", "tv_vit": "conv_proj", "hf_vit": "vit.embeddings"}
PATCH_CONVS = {"vit": "patch_embed.proj", "tv_vit": "conv_proj", "hf_vit": "vit.embeddings.patch_embeddings.projection"}


@pytest.mark.parametrize("family", sorted(FM.FAMILIES))
def test_suggestion_is_never_a_stem_a_trunk_or_an_attention_internal(family):
    from hardener.patches import suggest

    net = FM.FAMILIES[family]()
    c, size, _ = FM.INPUT_SHAPES.get(family, (3, 32, 32))
    infos = _infos(net, size, c)
    by_name = {i.name: i for i in infos}
    sug = suggest(net, infos)
    assert sug.stem == STEMS[family]
    assert not set(sug.sites) & NEVER.get(family, set()), sug.sites
    assert not any(".attn" in s or "attention" in s for s in sug.sites)
    for s in sug.sites:  # channels-first maps with some spatial extent or several tokens, each said why
        info = by_name[s]
        assert info.site and sug.why[s]
        assert (info.shape[1] * info.shape[2] if info.layout == "map" else info.shape[0]) > 1, (s, info.layout)
    assert len(sug.sites) == 2 and sug.stem not in sug.sites
    if family in PATCH_CONVS:  # token blocks are sites: blocks by depth (issue 21, item 1)
        assert all(by_name[s].layout == "tokens" for s in sug.sites), sug.sites
        maps = suggest(net, infos, layouts=("map",))  # a map-only kind (denoise): the patch embedding's conv it is
        conv = PATCH_CONVS[family]
        assert maps.sites == [conv] and f"besides the stem ('{conv}')" in maps.note
        assert maps.why[conv].startswith("the stem: no other module outputs a feature map")
    for trunk in {"blocks", "stages", "features"} & {n for n in by_name if by_name[n].site}:
        assert sug.skipped[trunk].startswith("trunk container")


def test_a_stem_chosen_as_the_last_resort_is_not_also_passed_over():
    """torchvision's ViT: `conv_proj` sits at the top level, so the search meets it; once it is chosen as the only
    feature map (for a kind that takes maps only), `harden patch` must not also print it under "passed over:
    conv_proj (stem)" (issue 21's bench)."""
    from torch import nn

    from hardener.patches import suggest

    class TvViTLike(nn.Module):
        def __init__(self, dim: int = 12) -> None:
            super().__init__()
            self.conv_proj = nn.Conv2d(3, dim, 8, 8)
            self.encoder = FM.vit_like().blocks
            self.heads = nn.Linear(dim, 10)

        def forward(self, x):
            return self.heads(self.encoder(self.conv_proj(x).flatten(2).transpose(1, 2))[:, 0])

    from hardener.patches.sites import MAP

    net = TvViTLike().eval()
    sug = suggest(net, _infos(net), layouts=(MAP,))  # a map-only kind (denoise); fixers get the token blocks
    assert sug.stem == "conv_proj" and sug.sites == ["conv_proj"]
    assert "conv_proj" not in sug.skipped
    assert not any("passed over" in line and "conv_proj" in line for line in sug.explain(["auto", "stem"]))


def test_attention_internals_are_not_sites():
    infos = {i.name: i for i in _infos(FM.vit_like())}
    q_norm = infos["blocks.4.attn.q_norm"]
    assert q_norm.shape == [3, 17, 4]  # heads x tokens x head_dim: 4-D, and no feature map
    assert not q_norm.site and "inside attention 'blocks.4.attn'" in q_norm.reason


def test_a_cnn_class_named_attention_is_no_attention_layer():
    from torch import nn

    class ResidualAttentionNet(nn.Sequential):  # a CNN whose class name says attention: its maps stay sites
        pass

    net = nn.Sequential(ResidualAttentionNet(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), nn.Flatten())
    infos = {i.name: i for i in _infos(net, size=8)}
    assert infos["0.2"].site and infos["0"].site


@pytest.mark.parametrize("family,nhwc,maps", [
    ("tv_convnext", ["features.1.0.block.1", "features.1.0.block.2", "features.1.0.block.3", "features.1.0.block.4",
                     "features.1.0.block.5"], ["features.1.0.block.0", "features.1.0.block.6", "features.1.0"]),
    ("convnext", ["stages.0.blocks.0.norm", "stages.0.blocks.0.mlp", "stages.0.blocks.0.mlp.fc1",
                  "stages.0.blocks.0.mlp.act"], ["stages.0.blocks.0.conv_dw", "stages.0.blocks.0", "stem.1"]),
])
def test_channels_last_internals_are_not_map_sites(family, nhwc, maps):
    from hardener.errors import InputError
    from hardener.patches import select_sites

    net = FM.FAMILIES[family]()
    infos = {i.name: i for i in _infos(net)}
    for name in nhwc:
        assert not infos[name].site and infos[name].reason.startswith("channels-last"), (name, infos[name])
    for name in maps:
        assert infos[name].site, (name, infos[name].reason)
    with pytest.raises(InputError, match="channels-last"):
        select_sites(net, list(infos.values()), nhwc[1], None)


def test_harden_layers_says_why(runner, tmp_path):
    from safetensors.torch import save_file

    from hardener.cli.app import main

    ck = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in FM.tv_convnext_like().state_dict().items()}, str(ck))
    args = ["layers", str(ck), "--arch", f"{FAMILY_FILE}:tv_convnext_like", "--input-shape", "3,32,32"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "channels-last" in r.stderr and "trunk container" in r.stderr and "stem: features.0" in r.stderr
    assert r.stdout.strip() == "features.2,features.3"
    r = runner.invoke(main, [*args, "--json"])
    got = __import__("json").loads(r.stdout)
    assert got["stem"] == "features.0" and got["passed_over"]["features"].startswith("trunk container")


# ---------------------------------------------------------------- the preset's cost


def test_robust_preset_on_a_features_style_model_costs_under_a_quarter_of_the_base(tmp_path):
    """torchvision's features-style models put the whole trunk in one top-level `features`: `stem` is its first
    block (16 channels at half resolution), not the trunk (576 channels at 1x1, a fixer as large as the base)."""
    from hardener.patches.layers import patch_cost

    patched, notes = _attach(FM.mobilenet_like(), _rgb_data(tmp_path), recipe="robust")
    sites = dict((s, patched.patches[k].kind) for s, k in patched.sites.items())
    assert sites == {"input": "prefilter", "features.0": "fixer", "features.4": "fixer", "features.8": "fixer"}
    assert any(n.startswith("site stem -> features.0") for n in notes)
    assert any(n.startswith("sites auto -> features.4") and "depth" in n for n in notes)
    cost = patch_cost(patched)
    assert cost["base_parameters"] > 1_000_000 and cost["parameters"] <= 0.25 * cost["base_parameters"]
    assert cost["macs"] > 0 and cost["base_macs"] > 0  # reported; the pre-filter at full resolution dominates them


def test_patch_prints_sites_and_cost_and_reports_the_cost(runner, tmp_path, tiny_ckpt, tiny_data):
    import json

    from hardener.cli.app import main

    from conftest import ARCH

    rep = tmp_path / "r.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--preset", "robust",
                             "--epochs", "1", "--steps", "1", "--select-on", "10", "--eval-samples", "10",
                             "--eval-steps", "1", "--width", "4", "--out", str(tmp_path / "p.safetensors"),
                             "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert "site stem -> features (" in r.stderr and "sites auto -> features.3 (" in r.stderr
    assert "patch cost: " in r.stderr and "multiply-adds per image" in r.stderr
    cost = json.loads(rep.read_text())["patch_cost"]
    assert cost["parameters"] > 0 and cost["base_parameters"] > 0 and cost["macs"] > 0


# ---------------------------------------------------------------- output size against the data's classes


def test_an_output_that_is_not_the_data_classes_is_a_loud_warning(runner, tmp_path, tiny_test_data):
    """`--logits 0` picks the 16-d features of a 3-class model: a 16-class model on 3-class labels, said on stderr
    and in the report's data warnings; `--logits 1` fits and says nothing."""
    import json

    from safetensors.torch import save_file

    from hardener.cli.app import main

    ck = tmp_path / "m.safetensors"
    save_file(FM.features_and_logits().state_dict(), str(ck))
    args = ["eval", str(ck), "--arch", f"{FAMILY_FILE}:features_and_logits", "--data", str(tiny_test_data), "--eps", "0.05", "--steps",
            "1", "--no-checks", "--quiet", "--threat", "whitebox"]
    r = runner.invoke(main, [*args, "--logits", "0", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    needle = "the model outputs 16 scores per image but the labels of"
    assert "warning:" in r.stderr and needle in r.stderr and "span only 3 classes" in r.stderr
    assert any(needle in w for w in json.loads((tmp_path / "r.json").read_text())["data"]["warnings"])
    r = runner.invoke(main, [*args, "--logits", "1"])
    assert r.exit_code == 0, r.output
    assert "scores per image" not in r.stderr


def test_class_names_that_do_not_match_the_output_size_are_a_warning(tmp_path):
    from hardener import data as hdata

    labels = torch.arange(12) % 3
    named = hdata.Dataset(torch.zeros(12, 1, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"], "named.npz")
    assert hdata.class_count_warning(named, 3) is None
    assert "names 3 classes" in hdata.class_count_warning(named, 5)
    plain = hdata.Dataset(named.images, labels, None, "plain.npz")
    assert hdata.class_count_warning(plain, 6) is None  # a few classes missing from a sample is no alarm
    assert "span only 3 classes" in hdata.class_count_warning(plain, 7)
    mapped = hdata.Dataset(named.images, labels, ["a", "b", "c"], "m", ["class names mapped to model indices by x"])
    assert hdata.class_count_warning(mapped, 1000) is None  # --classes said which outputs they are


def test_the_library_warns_too(tmp_path):
    import warnings

    net = FM.efficientnet_like(num_classes=10)
    x = torch.rand(12, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = hardener.evaluate(net, (x, torch.arange(12) % 2), attacks="fgsm", eps=0.01, threat="whitebox",
                                checks=False)
    assert any("span only 2 classes" in w for w in rep.data["data"]["warnings"])
    assert not [w for w in caught if "scores per image" in str(w.message)]  # evaluate reports it, patch warns


def test_suggestion_avoids_the_layers_that_get_twins():
    from hardener.patches import suggest

    import tiny_model

    net = tiny_model.tiny()
    infos = probe_tiny(net)
    assert "features.3" in suggest(net, infos).sites
    sug = suggest(net, infos, avoid=["features.3"])
    assert "features.3" not in sug.sites and sug.skipped["features.3"].startswith("a BatchNorm layer")


def probe_tiny(net):
    from hardener.patches.layers import probe

    return probe(Classifier(net, InputSpec(shape=[1, 8, 8])), torch.rand(2, 1, 8, 8))
