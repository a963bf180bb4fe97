"""Caching the frozen base: same training as without the cache, bounded memory, safe fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hardener import attacks as A
from hardener import data as hdata
from hardener.errors import InputError
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import AuxBN, Fixer, FixerConfig, PatchedModel, Prefilter
from hardener.training import fit as F
from hardener.training.cache import CacheStore, FrozenPrefix, parse_bytes

from conftest import make_data, trained_tiny


def _patched(sites=("features", "block"), seed=0) -> PatchedModel:
    torch.manual_seed(seed)
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8], mean=[0.3], std=[0.4])))
    for s in sites:
        p.attach(s, Fixer(8, FixerConfig()))
    return p


def _toy(n: int = 48) -> hdata.Dataset:
    imgs, labels = make_data(n=n, seed=4)
    return hdata.Dataset(imgs, labels, source="toy")


def _train(p, cfg, info=None, tmp=None):
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    return F.fit(p, _toy(), spec, cfg, torch.device("cpu"), info=info, cache_dir=tmp)


@pytest.mark.parametrize("sites", [("features", "block"), ("features",), ("features.4", "block")])
def test_cached_training_matches_uncached(sites, tmp_path):
    a, b = _patched(sites), _patched(sites)
    info: dict = {}
    _train(a, F.FitConfig(epochs=2, batch_size=16, cache=True), info, tmp_path)
    assert "is cached" in info["cache"], info
    _train(b, F.FitConfig(epochs=2, batch_size=16, cache=False))
    for k, v in a.patch_state_dict().items():
        assert torch.allclose(v, b.patch_state_dict()[k], atol=1e-5, rtol=1e-4), k


def test_prefix_plan_skips_modules_before_first_site():
    p = _patched(())
    p.attach("features.4", AuxBN.from_module(p.net.get_submodule("features.4")))
    p.attach("features.3", Fixer(8, FixerConfig()))
    prefix, why = FrozenPrefix.plan(p, torch.rand(4, 1, 8, 8))
    assert prefix is not None and prefix.site == "features.3", why
    assert prefix.stubs == ["features.0", "features.1", "features.2"], prefix.stubs
    # the tiny model adds the features' output back after 'block': skipping up to 'block' is refused
    q = _patched(("block",))
    prefix, why = FrozenPrefix.plan(q, torch.rand(4, 1, 8, 8))
    assert prefix is None and "uncached" in why


def test_no_prefix_for_input_or_auxbn_first_site():
    p = _patched(())
    p.attach("input", Prefilter(1, width=4))
    assert FrozenPrefix.plan(p, torch.rand(4, 1, 8, 8))[0] is None
    q = _patched(())
    q.attach("features.1", AuxBN.from_module(q.net.get_submodule("features.1")))
    prefix, why = FrozenPrefix.plan(q, torch.rand(4, 1, 8, 8))
    assert prefix is None and "auxiliary BN" in why


class SkipAround(nn.Module):
    """The stem's output is reused after the site: skipping the stem would change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = self.stem(x)
        h = self.mid(s) + s
        return self.head(h.mean((2, 3)))


def test_skip_connection_around_site_falls_back():
    p = PatchedModel(Classifier(SkipAround(), InputSpec(shape=[1, 8, 8])))
    p.attach("mid", Fixer(4, FixerConfig()))
    with torch.no_grad():
        p.patches["mid"].conv2.weight.normal_()  # a patch that does something
    prefix, why = FrozenPrefix.plan(p, torch.rand(4, 1, 8, 8))
    assert prefix is None and "uncached" in why


def test_cache_spills_to_disk_in_fp16_and_cleans_up(tmp_path):
    p = _patched()
    info: dict = {}
    _train(p, F.FitConfig(epochs=1, batch_size=16, cache_limit=1000), info, tmp_path)
    assert info["cache_spilled"] and "spilled to disk" in info["cache"]
    assert not list(tmp_path.glob(".harden-cache-*"))  # removed at the end
    store = CacheStore(limit=0, folder=tmp_path)
    store.create("a", (4, 3))
    store.put("a", slice(0, 4), torch.arange(12.0).view(4, 3) / 3)
    got = store.get("a", torch.tensor([2, 0]), torch.device("cpu"))
    assert got.dtype == torch.float32 and torch.allclose(got, torch.tensor([[2.0, 7 / 3, 8 / 3], [0, 1 / 3, 2 / 3]]),
                                                         atol=1e-3)
    store.close()
    assert not list(tmp_path.glob(".harden-cache-*"))


def test_parse_bytes():
    assert parse_bytes("2GiB", "x") == 2 << 30 and parse_bytes("512MB", "x") == 512_000_000
    assert parse_bytes("100", "x") == 100
    with pytest.raises(InputError):
        parse_bytes("lots", "--cache-limit")


def test_cached_prefix_feeds_joint_twins_as_uncached_training_does(tmp_path):
    """--twin-stats joint with a cached frozen prefix: the site's cached clean and adversarial outputs go in as one
    batch, and training lands where uncached training lands."""
    def twinned() -> PatchedModel:
        p = _patched(("features.3",))
        p.attach("features.4", AuxBN.from_module(p.net.get_submodule("features.4")))
        return p

    a, b = twinned(), twinned()
    info: dict = {}
    _train(a, F.FitConfig(epochs=2, batch_size=16, cache=True, twin_stats="joint"), info, tmp_path)
    assert "is cached" in info["cache"] and "features.3" in info["cache"], info
    _train(b, F.FitConfig(epochs=2, batch_size=16, cache=False, twin_stats="joint"))
    for k, v in a.patch_state_dict().items():
        assert torch.allclose(v, b.patch_state_dict()[k], atol=1e-5, rtol=1e-4), k
