"""Issue 21, item 1: token sites. Token fixers at transformer blocks (N,L,D), LayerNorm twins, site discovery that
offers blocks and never attention internals, and a ViT patched, evaluated and exported end to end. The ViTs are the
small ones of tests/family_models.py (torchvision and Hugging Face layouts on 28x28 grayscale, timm's on 32x32
RGB)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import (
    AuxBN,
    AuxLN,
    Fixer,
    FixerConfig,
    PatchedModel,
    Site,
    TokenFixer,
    ln_names,
    select_bn_sites,
    select_sites,
    suggest,
)

import family_models as FM
from conftest import HERE, assert_input_error, make_data

TV_ARCH = f"{HERE / 'family_models.py'}:tv_vit_like"
SHAPES = {"tv_vit": [1, 28, 28], "vit": [3, 32, 32], "hf_vit": [1, 28, 28]}


def _patched(family: str) -> PatchedModel:
    return PatchedModel(Classifier(FM.FAMILIES[family](), InputSpec(shape=SHAPES[family])))


def _infos(patched: PatchedModel) -> list:
    from hardener.patches.layers import probe

    return probe(patched.model, torch.rand(2, *patched.model.spec.shape))


def _x(family: str, n: int = 4) -> torch.Tensor:
    return torch.rand(n, *SHAPES[family], generator=torch.Generator().manual_seed(3))


def _toy(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n=n, classes=10, size=28)
    return x.float() / 255, y


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("vit")
    save_file({k: v.contiguous() for k, v in FM.tv_vit_like().state_dict().items()}, str(d / "vit.safetensors"))
    x, y = make_data(n=80, classes=10, size=28)
    np.savez(d / "data.npz", images=x.numpy(), labels=y.numpy())
    return d / "vit.safetensors", d / "data.npz"


# ---------------------------------------------------------------- the patches start as the base


@pytest.mark.parametrize("family", ["tv_vit", "vit", "hf_vit"])
@pytest.mark.parametrize("act,delta,rho", [("linear", 1.0, 4.0), ("softplus", 0.5, 1.0), ("tanh", 2.0, 0.5)])
def test_token_fixer_reproduces_the_base_exactly(family, act, delta, rho):
    """`fixer` at a token site builds the token fixer (zero-initialised last layer): logits bit-identical, for every
    ζ (softplus(0) ≠ 0 is subtracted), δ and ρ."""
    p = _patched(family)
    infos = _infos(p)
    x = _x(family)
    with torch.no_grad():
        base = p(x)
    sites = select_sites(p.net, infos, "auto", None)
    shapes = {i.name: i.shape for i in infos}
    cfg = FixerConfig(rho=rho, delta=delta, act=act)
    for kind, site in sites:
        p.attach(site, Fixer.build(Site(site, p.net.get_submodule(site), shapes[site]), cfg))
    patches = [p.patches[k] for k in p.sites.values()]
    assert patches and all(type(q) is TokenFixer and q.kind == "token-fixer" for q in patches)
    assert all(q.fc1.in_features == shapes[s][-1] == q.fc2.out_features for s, q in zip(p.sites, patches))
    assert patches[0].fc1.out_features == max(1, int(shapes[sites[0][1]][-1] // rho))
    with torch.no_grad():
        assert torch.equal(p(x), base)
        for q in patches:  # and the fixer does act once trained
            q.fc2.weight.normal_()
        assert not torch.equal(p(x), base)


@pytest.mark.parametrize("family", ["tv_vit", "vit", "hf_vit"])
def test_layernorm_twins_reproduce_the_base_exactly(family):
    """`--bn auto` on a model without BatchNorm twins its LayerNorms: copies of the layer (its non-trivial scales
    and shifts), trainable, the base's output on route adv and route main alike."""
    p = _patched(family)
    x = _x(family)
    with torch.no_grad():
        base = p(x)
    names = select_bn_sites(p.net, "auto")
    assert names == ln_names(p.net) and names == select_bn_sites(p.net, "all") and len(names) >= 9
    for site in names:
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    twins = [p.patches[k] for k in p.sites.values()]
    assert all(type(t) is AuxLN and t.kind == "auxln" and type(t.twin) is nn.LayerNorm for t in twins)
    assert all(q.requires_grad for t in twins for q in t.parameters()) and p.has_auxbn
    with torch.no_grad():
        assert torch.equal(p(x), base)
        with p.route("main"):
            assert torch.equal(p(x), base)
        twins[0].twin.weight.mul_(1.5)
        assert not torch.equal(p(x), base)
        with p.route("main"):
            assert torch.equal(p(x), base)


def test_layernorm2d_twins_on_a_convnext_are_exact():
    """ConvNeXt has no BatchNorm: `--bn auto` twins its LayerNorms, the channels-first LayerNorm2d ones too."""
    p = PatchedModel(Classifier(FM.convnext_like(), InputSpec(shape=[3, 32, 32])))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        base = p(x)
    names = select_bn_sites(p.net, "auto")
    assert "stem.1" in names and "stages.0.blocks.0.norm" in names
    for site in names:
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    assert type(p.patches[p.sites["stem.1"]].twin) is FM.LayerNorm2d
    with torch.no_grad():
        assert torch.equal(p(x), base)


# ---------------------------------------------------------------- training changes the patches only


def test_training_token_fixers_and_layernorm_twins_keeps_the_base_bit_identical(tmp_path):
    x, y = _toy()
    net = FM.tv_vit_like()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = hardener.patch(net, (x, y), method="fixer,auxbn", bn="auto", at="auto", epochs=1, steps=1, batch_size=16,
                       select_on=10, eps=0.1, allow_low_accuracy=True)  # an untrained ViT: near chance
    kinds = {s["site"]: s["kind"] for s in p.patch_specs()}
    assert {kinds["encoder.layers.encoder_layer_0"], kinds["encoder.layers.encoder_layer_2"]} == {"token-fixer"}
    assert kinds["encoder.ln"] == kinds["encoder.layers.encoder_layer_1.ln_2"] == "auxln"
    after = p.base_state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    trained = p.patch_state_dict()
    assert trained["harden.encoder.layers.encoder_layer_0.fc2.weight"].abs().sum() > 0
    assert not torch.equal(trained["harden.encoder.ln.twin.weight"], before["encoder.ln.weight"])
    # through the manifest: the same logits, the twins copied again from the base's own LayerNorms
    p.save(tmp_path / "v.safetensors", arch=TV_ARCH)
    again = hardener.load(tmp_path / "v.safetensors", arch=TV_ARCH).eval()
    specs = {s["site"]: s for s in again.manifest.patches}
    assert specs["encoder.ln"] == {"kind": "auxln", "site": "encoder.ln", "type": "LayerNorm", "shape": [16],
                                   "eps": 1e-6, "affine": True, "bias": True}
    with torch.no_grad():
        assert torch.equal(again(x[:6]), p.eval()(x[:6]))
        with again.route("main"), again.patches_disabled():
            assert torch.equal(again(x[:6]), FM.tv_vit_like()(x[:6]))


# ---------------------------------------------------------------- site discovery


def test_vit_sites_are_blocks_never_attention_internals():
    p = _patched("vit")
    infos = {i.name: i for i in _infos(p)}
    sug = suggest(p.net, list(infos.values()))
    assert sug.sites == ["blocks.1", "blocks.3"] and sug.stem == "patch_embed"
    assert "17 tokens x 12" in sug.why["blocks.1"]
    for name, info in infos.items():
        if ".attn." in name:  # q/k/v, q_norm, head-split tensors, the projection inside
            assert not info.site and info.reason.startswith("inside attention"), name
    assert infos["blocks.2.attn"].layout == "tokens"  # the attention branch's output is tokens, but never suggested
    finer = suggest(p.net, list(infos.values()), parts=16)
    assert not any(".attn" in s for s in finer.sites)
    with pytest.raises(InputError, match="inside attention"):
        select_sites(p.net, list(infos.values()), "blocks.2.attn.q_norm", None)


def test_hugging_face_layers_offer_their_residual_output():
    """transformers' ViTLayer returns a tuple and sits in a ModuleList that is never called: the search looks into
    both, and a layer stands for itself through the site it computes last (ViTOutput: dense, dropout, + the layer's
    input), not its norms, which it defines last but calls first."""
    p = _patched("hf_vit")
    infos = {i.name: i for i in _infos(p)}
    assert not infos["vit.encoder.layer.2"].site and infos["vit.encoder.layer.2"].reason == "output is not a tensor"
    sug = suggest(p.net, list(infos.values()))
    assert sug.sites == ["vit.encoder.layer.1.output", "vit.encoder.layer.3.output"] and sug.stem == "vit.embeddings"
    assert all(infos[f"vit.encoder.layer.{i}.attention.attention.query"].reason.startswith("inside attention")
               for i in range(6))
    x = _x("hf_vit")
    with torch.no_grad():
        base = p(x)
    shapes = {n: i.shape for n, i in infos.items()}
    for _, site in select_sites(p.net, list(infos.values()), "stem,auto", None):
        p.attach(site, Fixer.build(Site(site, p.net.get_submodule(site), shapes[site]), FixerConfig()))
    assert {q.kind for q in p.patches.values()} == {"token-fixer"}
    with torch.no_grad():
        assert torch.equal(p(x), base)


def test_a_map_only_kind_is_refused_at_tokens_and_a_token_kind_at_maps():
    p = _patched("tv_vit")
    infos = _infos(p)
    with pytest.raises(InputError, match=r"tokens \(N,L,D\), which denoise patches do not take.*fixer or token-fixer"):
        select_sites(p.net, infos, "denoise:encoder.layers.encoder_layer_1", None)
    with pytest.raises(InputError, match="feature map.*which token-fixer patches do not take"):
        select_sites(p.net, infos, "token-fixer:conv_proj", None)
    # `auto` looks for what the kind serves: maps for denoise (the patch-embedding conv, the only one), tokens for
    # token-fixer; `stem` is the conv, a map
    assert select_sites(p.net, infos, "denoise:auto", None) == [("denoise", "conv_proj")]
    blocks = [("fixer", f"encoder.layers.encoder_layer_{i}") for i in (0, 2)]
    assert select_sites(p.net, infos, "stem,auto", None) == [("fixer", "conv_proj"), *blocks]
    assert select_sites(p.net, infos, "token-fixer:auto", None)[0] == ("token-fixer", "encoder.layers.encoder_layer_0")


def test_channels_first_sequences_are_not_token_sites():
    """A 1-D convolution's N,C,L output (and what keeps its layout) is no token tensor; transposed, it is."""
    class Transpose(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2)

    net = nn.Sequential(nn.Flatten(2), nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), Transpose(),
                        nn.LayerNorm(6), nn.Linear(6, 5), nn.Flatten(1), nn.Linear(5 * 16, 3)).eval()
    p = PatchedModel(Classifier(nn.Sequential(nn.Conv2d(1, 4, 1), net), InputSpec(shape=[1, 4, 4])))
    infos = {i.name: i for i in _infos(p)}
    for name in ("1.0", "1.1", "1.2", "1.3"):
        assert not infos[name].site and infos[name].reason.startswith("channels-first (N,C,L)"), infos[name]
    for name in ("1.4", "1.5", "1.6"):
        assert infos[name].layout == "tokens", infos[name]


def test_harden_layers_shows_token_sites(runner, vit_files):
    ck, _ = vit_files
    r = runner.invoke(main, ["layers", str(ck), "--arch", TV_ARCH, "--input-shape", "1,28,28", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    layers = {i["name"]: i for i in got["layers"]}
    assert got["suggested_sites"] == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"]
    assert layers["encoder.layers.encoder_layer_1"]["layout"] == "tokens" and layers["conv_proj"]["layout"] == "map"
    assert not layers["encoder.layers.encoder_layer_1.self_attention"]["site"]


# ---------------------------------------------------------------- --bn on LayerNorms


def test_bn_selection_of_layernorms():
    p = _patched("tv_vit")
    assert select_bn_sites(p.net, r"encoder\.layers\..*\.ln_1") == [
        f"encoder.layers.encoder_layer_{i}.ln_1" for i in range(4)]
    assert select_bn_sites(p.net, "encoder.ln") == ["encoder.ln"]
    with pytest.raises(InputError, match="not a BatchNorm or LayerNorm layer"):
        select_bn_sites(p.net, "conv_proj")
    with pytest.raises(InputError, match="matches no BatchNorm or LayerNorm"):
        select_bn_sites(p.net, "nothing.*")
    bare = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(2), nn.LayerNorm(4, elementwise_affine=False))
    assert select_bn_sites(bare, "auto") == []
    with pytest.raises(InputError, match="no BatchNorm layers.*no LayerNorm layers with affine parameters"):
        select_bn_sites(bare, "all")
    with pytest.raises(InputError, match="without affine parameters"):
        select_bn_sites(nn.Sequential(nn.BatchNorm2d(2), nn.LayerNorm(4, elementwise_affine=False)), "1")


def test_stored_layernorm_twins_are_checked_against_the_base():
    """Manifest specs of token patches are validated field by field; a twin is rebuilt only from the base's own
    LayerNorm of the recorded class, shape and eps, never from a class name."""
    from hardener.io import manifest as V

    spec = {"kind": "auxln", "site": "encoder.ln", "type": "LayerNorm", "shape": [16], "eps": 1e-6, "affine": True,
            "bias": True}
    assert V.validate_patch(spec, 0, "f") == spec and V.patch_numel(spec) == 32
    assert V.validate_patch({k: v for k, v in spec.items() if k != "bias"}, 0, "f")["bias"] is True
    for key, bad, needle in [("shape", [0], "patches[0].shape"), ("shape", [1 << 20, 1 << 20], "patches[0].shape"),
                             ("shape", "16", "patches[0].shape"), ("eps", -1, "patches[0].eps"),
                             ("type", "os.system", "patches[0].type"), ("bias", "yes", "patches[0].bias"),
                             ("affine", 1, "patches[0].affine")]:
        with pytest.raises(InputError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            V.validate_patch({**spec, key: bad}, 0, "f")
    ln = FM.tv_vit_like().encoder.ln
    assert type(AuxLN.restore(spec, ln).twin) is nn.LayerNorm
    for key, bad in [("shape", [8]), ("eps", 1e-5), ("type", "RMSNorm"), ("bias", False)]:
        with pytest.raises(InputError, match="the architecture the model was patched with"):
            AuxLN.restore({**spec, key: bad}, ln)
    with pytest.raises(InputError, match="not a LayerNorm"):
        AuxLN.restore(spec, nn.Linear(16, 16))
    with pytest.raises(InputError, match="rebuilt from the base's own layer"):
        AuxLN.from_spec({**spec, "type": "LayerNorm2d"})
    fixer = {"kind": "token-fixer", "site": "encoder", "channels": 16, "rho": 4.0, "delta": 1.0, "act": "linear",
             "final_relu": False}
    assert V.patch_numel(V.validate_patch(fixer, 0, "f")) == 32 + 16 * 4 + 4 + 4 * 16 + 16
    with pytest.raises(InputError, match="hidden channels"):
        V.patch_numel({**fixer, "rho": 1e-9})
    with pytest.raises(InputError, match=r"patches\[0\].act"):
        V.validate_patch({**fixer, "act": "exec"}, 0, "f")


def test_a_crafted_layernorm_twin_at_another_layer_is_one_error_line(runner, tmp_path, vit_files):
    from test_security import read_patched, write_patched

    ck, data = vit_files
    x, y = _toy(40)
    p = hardener.patch(FM.tv_vit_like(), (x, y), method="auxbn", bn="encoder.ln", epochs=1, steps=1, batch_size=20,
                       select_on=0)
    p.save(tmp_path / "p.safetensors", arch=TV_ARCH)
    m, t = read_patched(tmp_path / "p.safetensors")
    m["patches"][0]["site"] = "conv_proj"
    t = {k.replace("harden.encoder.ln.", "harden.conv_proj."): v for k, v in t.items()}
    f = write_patched(tmp_path / "crafted.safetensors", m, t)
    r = runner.invoke(main, ["predict", str(f), "--arch", TV_ARCH, "--data", str(data), "--quiet"])
    assert_input_error(r, "auxiliary LayerNorm at 'conv_proj', which is a Conv2d")


# ---------------------------------------------------------------- the ordinary path, end to end


def test_patch_eval_and_export_a_vit_with_the_default_recipe(runner, tmp_path, vit_files):
    """`harden patch` with the default recipe (`--at prefilter:input,stem,auto`) on a ViT: a pre-filter, a conv
    fixer after the patch embedding, token fixers in the blocks; then `harden eval`, then export (torch.export and
    ONNX), each file checked in a fresh interpreter."""
    ck, data = vit_files
    out = tmp_path / "vit.hardened.safetensors"
    r = runner.invoke(main, ["patch", str(ck), "--arch", TV_ARCH, "--data", str(data), "--epochs", "1", "--steps", "1",
                             "--select-on", "10", "--eval-samples", "10", "--eval-steps", "1", "--width", "4",
                             "--out", str(out), "--allow-low-accuracy"])  # an untrained ViT: near chance
    assert r.exit_code == 0, r.output
    assert "site stem -> conv_proj (" in r.stderr
    assert "sites auto -> encoder.layers.encoder_layer_0 (block output at 28% depth, 17 tokens x 16)" in r.stderr
    kinds = {s["site"]: s["kind"] for s in hardener.load(out, arch=TV_ARCH).manifest.patches}
    assert kinds == {"input": "prefilter", "conv_proj": "fixer", "encoder.layers.encoder_layer_0": "token-fixer",
                     "encoder.layers.encoder_layer_2": "token-fixer"}
    r = runner.invoke(main, ["eval", str(out), "--arch", TV_ARCH, "--data", str(data), "--eps", "0.05", "--steps", "1",
                             "--attack", "apgd-ce", "--max-samples", "10", "--no-checks", "--quiet", "--json",
                             "--allow-low-accuracy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["clean"] is not None
    fmts = ["export"] + (["onnx"] if _has("onnx") and _has("onnxruntime") else [])
    for fmt in fmts:
        r = runner.invoke(main, ["export", str(out), "--arch", TV_ARCH, "--format", fmt])
        assert r.exit_code == 0, r.output
        assert "checked in a fresh interpreter" in r.stderr


def test_torchscript_traces_multihead_attention_with_token_patches(tmp_path):
    """torch.jit.trace's own check ran nn.MultiheadAttention on two paths (trainable patches switch it between calls)
    and failed: it is traced without gradients now."""
    from hardener.io import export as X

    p = _patched("tv_vit")
    infos = _infos(p)
    shapes = {i.name: i.shape for i in infos}
    for _, site in select_sites(p.net, infos, "auto", None):
        p.attach(site, Fixer.build(Site(site, p.net.get_submodule(site), shapes[site]), FixerConfig()))
    with torch.no_grad():
        for q in p.patches.values():
            q.fc2.weight.normal_()
    X.export(p, [1, 28, 28], "torchscript", tmp_path / "m.ts.pt")
    x = _x("tv_vit", 5)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.ts.pt"))(x), p.eval()(x), atol=1e-5)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
