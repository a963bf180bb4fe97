"""Issue 34: the backbones people use, correctly: auxiliary and reshaped norms, the caller's module left alone,
channels-last stages. The models are tiny look-alikes built in tests/backbone_models.py (no torchvision or timm), untrained: their
accuracy is chance, so their `harden patch` runs pass --allow-low-accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hardener
from hardener.cli.app import main
from hardener.training.cache import BatchLayout, Uncacheable

import backbone_models as BM
from conftest import HERE

BACKBONES = HERE / "backbone_models.py"


def _rgb_data(tmp_path, n: int = 60, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 255).round().to(torch.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, images=x.numpy(), labels=(torch.arange(n) % classes).numpy())
    return path


def _checkpoint(tmp_path, name: str):
    net = getattr(BM, name)()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


PATCH = ["--epochs", "1", "--steps", "1", "--eps", "0.03", "--batch-size", "16", "--eval-samples", "6",
         "--eval-steps", "1", "--select-on", "0", "--holdout", "10"]


@pytest.mark.parametrize("name,no_cache", [("googlenet_like", False), ("levit_like", False), ("levit_like", True)])
def test_auxiliary_and_reshaped_norms_patch_with_bn_auto(runner, tmp_path, name, no_cache):
    """GoogLeNet's aux heads hold BatchNorms that never run in eval mode: they get no twin (one line says so);
    LeViT's BatchNorm1d sees a (B·N, C) reshape: cached by layout. Exit 0, the base bit-identical, every twin used."""
    net, ck = _checkpoint(tmp_path, name)
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", "--allow-low-accuracy", str(ck), "--arch", f"{BACKBONES}:{name}", "--data",
                             str(_rgb_data(tmp_path)),
                             "--method", "fixer,auxbn", "--bn", "auto", "--out", str(out), *PATCH,
                             *(["--no-cache"] if no_cache else [])])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    again = hardener.load(out, arch=f"{BACKBONES}:{name}").eval()
    twins = {s for s, k in again.sites.items() if again.patches[k].kind == "auxbn"}
    bns = {n for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    if name == "googlenet_like":
        assert twins == {n for n in bns if not n.startswith("aux")} and twins
        assert "never run in the eval-mode forward and get no twin (aux1.conv.bn, aux2.conv.bn)" in r.stderr
    else:
        assert twins == bns and "stages.0.mlp.ln1.bn" in twins
        assert "training runs uncached" not in r.stderr and "cannot be cached" not in r.stderr
    stored = load_file(str(out))
    for k, v in net.state_dict().items():
        assert torch.equal(stored[k], v), k
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        with again.patches_disabled():
            assert torch.equal(again(x), want)
        again.set_strength(0.0)
        assert torch.equal(again(x), want)


def test_batch_layout_stores_one_entry_per_sample():
    tokens = torch.randn(3, 5, 4)  # (B, N, C)
    one = BatchLayout.find("bn", tokens[:1].flatten(0, 1), tokens[:2].flatten(0, 1))
    assert (one.axis, one.rows) == (0, 5)
    stored = one.store(tokens.flatten(0, 1), 3)
    assert torch.equal(stored, tokens) and torch.equal(one.load(stored[[2, 0]]), tokens[[2, 0]].flatten(0, 1))
    seq = tokens.transpose(0, 1)  # (N, B, C): the batch on axis 1
    second = BatchLayout.find("x", seq[:, :1], seq[:, :2])
    assert (second.axis, second.rows) == (1, 1)
    assert torch.equal(second.load(second.store(seq, 3)[[1]]), seq[:, [1]])
    with pytest.raises(Uncacheable, match="mixes the samples"):  # (N·B, C): rows interleaved across samples
        BatchLayout.find("y", seq[:, :1].flatten(0, 1), seq[:, :2].flatten(0, 1))
    with pytest.raises(Uncacheable, match="no axis that holds the batch"):
        BatchLayout.find("z", torch.randn(4, 4), torch.randn(4, 4))


def test_a_model_that_cannot_be_cached_trains_uncached_with_a_note():
    """Features whose rows interleave the samples cannot be cached: training runs uncached, said once."""
    from torch import nn

    from hardener import attacks as A
    from hardener import data as hdata
    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import AuxBN, PatchedModel
    from hardener.training import fit as F

    class SeqFirst(nn.Module):  # BatchNorm1d over (N·B, C): sequence-major rows
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, 4)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.conv(x).flatten(2).permute(2, 0, 1)  # (N, B, C)
            n, b, c = t.shape
            return self.head(self.bn(t.reshape(n * b, c)).view(n, b, c).mean(0))

    torch.manual_seed(0)
    p = PatchedModel(Classifier(SeqFirst().eval(), InputSpec(shape=[3, 16, 16])))
    p.attach("bn", AuxBN.from_module(p.net.bn))
    g = torch.Generator().manual_seed(0)
    ds = hdata.Dataset((torch.rand(32, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.arange(32) % 3)
    info: dict = {}
    F.fit(p, ds, A.AttackSpec("pgd", eps=0.03, steps=1, n_classes=3), F.FitConfig(epochs=1, batch_size=16),
          torch.device("cpu"), info=info)
    assert "cannot be cached" in info["cache"] and "training runs uncached" in info["cache"], info


def test_patch_leaves_the_callers_module_as_it_was():
    """`hardener.patch` works on a copy: the caller's module keeps its hooks (none added), requires_grad flags,
    train/eval mode of every layer, and logits; `evaluate` too."""
    from conftest import make_data, trained_tiny

    net = trained_tiny()
    net.features[0].weight.requires_grad_(False)  # the caller's own mix of flags and modes
    net.train()
    net.block.eval()
    imgs, labels = make_data(n=60)
    x, y = imgs.float() / 255, labels

    def state(m):
        hooks = sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())
        return ({n: p.requires_grad for n, p in m.named_parameters()}, {n: s.training for n, s in m.named_modules()},
                hooks, {k: v.clone() for k, v in m.state_dict().items()})

    def logits(m):
        modes = {n: s.training for n, s in m.named_modules()}
        m.eval()
        with torch.no_grad():
            out = m(x[:8])
        for n, s in m.named_modules():
            s.training = modes[n]
        return out

    before, want = state(net), logits(net)
    patched = hardener.patch(net, (x, y), at="block", eps=0.1, epochs=1, steps=1, batch_size=32, select_on=0,
                             holdout=0)
    with torch.no_grad():
        patched.patches["block"].conv2.weight.normal_()  # a patch that changes the logits
        assert not torch.equal(patched(x[:8]), want)
    hardener.evaluate(net, (x[:8], y[:8]), attacks="fgsm", eps=0.1, threat="whitebox", checks=False)
    after = state(net)
    assert after[:3] == before[:3]
    assert all(torch.equal(v, before[3][k]) for k, v in after[3].items())
    assert torch.equal(logits(net), want)
    assert patched.model.net is not net


# ---------------------------------------------------------------- channels-last stages


def _layers(runner, ck, name):
    r = runner.invoke(main, ["layers", str(ck), "--arch", f"{BACKBONES}:{name}", "--input-shape", "3,32,32",
                             "--json"])
    assert r.exit_code == 0, r.output
    import json

    got = json.loads(r.stdout)
    return {i["name"]: i for i in got["layers"]}, got


def test_a_channels_last_trunk_is_patched_in_its_own_layout(runner, tmp_path):
    """timm Swin: every stage is (N,H,W,C), its permutes function calls. The sites are tokens on an H,W grid (a
    token fixer with the real channel count), the default ones stage outputs after the residual sums, never a
    drop-path branch before its sum."""
    net, ck = _checkpoint(tmp_path, "swin_like")
    layers, got = _layers(runner, ck, "swin_like")
    assert got["suggested_sites"] == ["layers.0", "layers.1"] and got["stem"] == "patch_embed"
    dp = layers["layers.1.blocks.0.drop_path1"]
    assert dp["site"] and dp["layout"] == "tokens" and dp["shape"] == [4, 4, 16]
    assert not layers["layers.0.blocks.0.attn"]["site"]  # windows folded into the batch
    assert "windows or tokens folded into the batch" in layers["layers.0.blocks.0.attn"]["reason"]
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", "--allow-low-accuracy", str(ck), "--arch", f"{BACKBONES}:swin_like", "--data",
                             str(_rgb_data(tmp_path)),
                             "--at", "auto,layers.1.blocks.0.drop_path1", "--out", str(out), *PATCH])
    assert r.exit_code == 0, r.output
    again = hardener.load(out, arch=f"{BACKBONES}:swin_like").eval()
    specs = {s["site"]: s for s in again.manifest.patches}
    assert set(specs) == {"layers.0", "layers.1", "layers.1.blocks.0.drop_path1"}
    assert {s["kind"] for s in specs.values()} == {"token-fixer"}
    assert specs["layers.1.blocks.0.drop_path1"]["channels"] == 16 and specs["layers.0"]["channels"] == 8
    stored = load_file(str(out))
    assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        again.set_strength(0.0)
        assert torch.equal(again(x), net(x))


def test_channels_last_insides_of_channels_first_blocks_are_refused(runner, tmp_path):
    """timm MaxViT: NCHW blocks permute to channels-last with function calls inside. Their drop-path output is no map
    site (`harden layers` says why; `--at` on it is exit 2, one line); the suggested sites are the blocks."""
    from conftest import assert_input_error

    _, ck = _checkpoint(tmp_path, "maxvit_like")
    layers, got = _layers(runner, ck, "maxvit_like")
    dp = layers["stages.0.1.drop_path"]
    assert not dp["site"] and dp["reason"].startswith("channels-last (N,H,W,C)") and dp["shape"] == [16, 16, 8]
    assert got["suggested_sites"] == ["stages.0.0", "stages.1.1"]
    assert all(layers[s]["layout"] == "map" for s in got["suggested_sites"])
    r = runner.invoke(main, ["patch", "--allow-low-accuracy", str(ck), "--arch", f"{BACKBONES}:maxvit_like", "--data",
                             str(_rgb_data(tmp_path)), "--at", "stages.0.1.drop_path", "--out", str(tmp_path / "p"),
                             *PATCH])
    assert_input_error(r, "stages.0.1.drop_path", "channels-last")


def test_a_named_norm_that_never_runs_is_one_error():
    """`--bn aux1.conv.bn`: a twin that would never be used is refused by name; `all` leaves it out and says so."""
    from hardener.errors import InputError
    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import select_bn_sites
    from hardener.patches.layers import probe

    net = BM.googlenet_like()
    ran = {i.name for i in probe(Classifier(net, InputSpec(shape=[3, 32, 32])), torch.rand(2, 3, 32, 32)) if i.calls}
    with pytest.raises(InputError, match="'aux1.conv.bn' never runs in the model's forward"):
        select_bn_sites(net, "conv1.bn,aux1.conv.bn", ran)
    heard: list[str] = []
    chosen = select_bn_sites(net, "all", ran, heard.append)
    assert "conv1.bn" in chosen and not any(n.startswith("aux") for n in chosen)
    assert len(heard) == 1 and "2 norm layer(s) never run" in heard[0]
    with pytest.raises(InputError, match="none of the norm layers it names runs"):
        select_bn_sites(net, "aux1.*", ran)


def test_bn_auto_on_a_model_without_norms_says_so():
    from torch import nn

    from hardener.patches import select_bn_sites

    heard: list[str] = []
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    assert select_bn_sites(net, "auto", {"0", "1", "2"}, heard.append) == []
    assert heard == ["--bn auto: the model has no BatchNorm with running statistics and no LayerNorm with affine "
                     "parameters (its 1 GroupNorm layers get no twins): no twins; the site patches train"]
