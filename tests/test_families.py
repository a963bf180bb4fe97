"""Issue 21, item 0: correct on every family — BN twins of activation-fused BNs, site discovery on timm and
torchvision layouts, the preset's cost on features-style models, output size against the data's classes. The models
mimic those families' structure (tests/family_models.py); no torchvision or timm needed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import family_models as FM
import hardener
from hardener.model import Classifier, InputSpec
from hardener.patches import AuxBN, PatchedModel, select_bn_sites

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

    patched = api.as_patched(net)
    infos = api.finish(patched, api.as_dataset(str(data)), torch.device("cpu"))
    opts, _ = api.PatchOptions.build(recipe, options)
    notes: list[str] = []
    api.attach_patches(patched, infos, opts, say=notes.append)
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
