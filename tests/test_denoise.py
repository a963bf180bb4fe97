"""Feature-denoising patches and smooth-gradient attacks."""
from __future__ import annotations

import json

import pytest
import torch

import hardener
from hardener import attacks as A
from hardener.cli.app import main
from hardener.io.checkpoint import read_manifest
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import DENOISE_OPS, Denoise, DenoiseConfig, PatchedModel

from conftest import ARCH, FAST_PATCH, trained_tiny


@pytest.mark.parametrize("op", DENOISE_OPS)
def test_zero_initialised_block_reproduces_base(op):
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    p.attach("block", Denoise(8, DenoiseConfig(op=op)))
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        a = p(x)
        with p.patches_disabled():
            b = p(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("op", DENOISE_OPS)
def test_denoising_shapes_and_gradients(op):
    torch.manual_seed(0)
    block = Denoise(5, DenoiseConfig(op=op, chunk=7))
    torch.nn.init.normal_(block.conv.weight)
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and block.denoise(x).shape == x.shape
    (g,) = torch.autograd.grad((y ** 2).sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert float((g - 2 * y.detach()).abs().sum()) > 0  # the denoising path contributes


def test_chunked_nonlocal_equals_unchunked():
    torch.manual_seed(1)
    a = Denoise(4, DenoiseConfig(op="nonlocal-gaussian", chunk=5))
    b = Denoise(4, DenoiseConfig(op="nonlocal-gaussian", chunk=10_000))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4, 6, 6)
    assert torch.allclose(a.denoise(x), b.denoise(x), atol=1e-6)


def test_median_is_the_neighbourhood_median():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 100.0  # an outlier the median removes
    y = Denoise(1, DenoiseConfig(op="median")).denoise(x)
    assert float(y[0, 0, 1, 1]) == 0.0


def test_smooth_grad_changes_input_gradients_not_logits():
    model = Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])

    def grad_and_logits():
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), xg)
        return g, out.detach()
    g0, l0 = grad_and_logits()
    with A.smooth_relu_gradients(model, 10.0):
        g1, l1 = grad_and_logits()
    g2, l2 = grad_and_logits()
    assert torch.equal(l0, l1) and torch.equal(l0, l2)  # forward unchanged, also after leaving
    assert not torch.allclose(g0, g1) and torch.equal(g0, g2)
    assert A.parse_smooth_grad("softplus:10") == 10.0
    with pytest.raises(Exception, match="softplus"):
        A.parse_smooth_grad("relu:3")


def test_cli_denoise_mixed_with_fixer_loads_back(runner, tmp_path, tiny_ckpt, tiny_data, tiny_test_data):
    out = tmp_path / "d.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "features,denoise:block", "--denoise", "bilateral", "--smooth-grad",
                             "softplus:10", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert [(p["kind"], p["site"]) for p in m.patches] == [("fixer", "features"), ("denoise", "block")]
    assert m.patches[1]["op"] == "bilateral" and m.training["attack"]["smooth_grad"] == 10.0
    model = hardener.load(out, arch=ARCH)
    assert isinstance(model.patches["block"], Denoise)
    r = runner.invoke(main, ["eval", str(out), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd",
                             "--steps", "3", "--eps", "0.1", "--smooth-grad", "softplus:10", "--no-checks", "--json",
                             "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["attack_settings"][0]["smooth_grad"] == 10.0


def test_cli_method_denoise_default_kind(runner, tmp_path, tiny_ckpt, tiny_data):
    out = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--method", "denoise", "--denoise", "median", "--at", "block", "--out", str(out),
                             *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert read_manifest(out).patches[0]["kind"] == "denoise"
