"""Issue 30's overhead cuts compute what the patches computed before, to the bit: a norm layer's twin runs instead of
the layer on route adv (no longer after it, through hooks), and the fixers and the pre-filter leave out the passes
that change no bit (x − 0, 1·x, a fresh ReLU output allocated again). Each test holds the patched model against the
earlier computation, written out here: outputs on both routes, with patches disabled, gradients, statistics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import AuxBN, Fixer, FixerConfig, PatchedModel, Prefilter
from hardener.patches.fixer import ACTIVATIONS, TokenFixer


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(1), nn.Linear(6, 3))
    with torch.no_grad():  # statistics and affine parameters of a trained base
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _patched(net: nn.Module) -> PatchedModel:
    p = PatchedModel(Classifier(net, InputSpec(shape=[1, 6, 6])))
    p.attach("0", Fixer(4, FixerConfig(rho=2)))
    for site in ("1", "4"):
        p.attach(site, AuxBN.from_module(net.get_submodule(site)))
    with torch.no_grad():  # trained patches: twins and fixer differ from the base
        for t in p.patches.parameters():
            t.add_(0.2 * torch.randn_like(t))
        for k in ("1", "4"):
            p.patches[k].twin.running_mean.add_(0.3)
    return p


def _reference(p: PatchedModel) -> tuple[nn.Module, dict]:
    """The earlier computation: a copy of the base and of the patches, the twins as forward hooks after the base's BN
    (which runs, in eval mode, on route adv) and the fixer as a forward hook, exactly as `attach` placed them."""
    net = p.base_copy().net  # without harden's hooks and twin forwards
    for t in net.parameters():
        t.requires_grad_(p.finetune_base)
    patches = copy.deepcopy(p.patches)
    state = {"route": "adv"}

    def guard(m, _inp):
        m._was = m.training
        if state["route"] == "adv":
            m.training = False

    def twin(key):
        def hook(m, inp, out):
            m.training = m._was
            if state["route"] != "adv":
                return out
            s, new = patches[key].strength, patches[key].twin(inp[0])
            return out if s == 0 else new if s == 1 else out + s * (new - out)
        return hook
    net[0].register_forward_hook(lambda _m, _i, out: patches["0"](out))
    for k in ("1", "4"):
        net[int(k)].register_forward_pre_hook(guard)
        net[int(k)].register_forward_hook(twin(k))
    return net, {"patches": patches, "state": state}


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_twins_replace_the_layer_and_compute_what_the_hooks_did(strength):
    net = _net()
    bare = copy.deepcopy(net)
    p = _patched(net)
    ref, r = _reference(p)
    p.set_strength(strength)
    for patch in r["patches"].values():
        patch.strength = strength
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        for route in ("adv", "main"):
            r["state"]["route"] = route
            with p.route(route):
                assert torch.equal(p.model.net(x), ref(x)), route
        with p.patches_disabled():
            assert torch.equal(p.model.net(x), bare(x))
        with p.capture() as feats:
            p.model.net(x)
        assert set(feats) == {"0", "1", "4"}
    assert not torch.equal(p.model.net(x), bare(x)) or strength == 0
    assert p.net.state_dict().keys() == bare.state_dict().keys()
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in p.net.state_dict().items())
    assert [n for n, _ in p.net.named_modules()] == [n for n, _ in bare.named_modules()]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_twins_train_as_before_and_leave_the_base_statistics_on_route_adv(strength):
    """Train mode with the base trained too (a full fine-tuning method): the twins' statistics and the gradients as
    before; route adv leaves the base's BN statistics alone, route main updates them."""
    p = _patched(_net())
    p.finetune_base = True
    for t in p.model.parameters():
        t.requires_grad_(True)
    ref, r = _reference(p)
    p.set_strength(strength)
    for patch in r["patches"].values():
        patch.strength = strength
    p.train()
    ref.train()
    r["patches"].train()
    x = torch.randn(8, 1, 6, 6)
    base_stats = {k: v.clone() for k, v in p.net.state_dict().items() if "running" in k}
    for route in ("adv", "main"):
        r["state"]["route"] = route
        with p.route(route):
            p.model.net(x).square().mean().backward()
        ref(x).square().mean().backward()
        if route == "adv":
            assert all(torch.equal(p.net.state_dict()[k], v) for k, v in base_stats.items())
    assert any(not torch.equal(p.net.state_dict()[k], v) for k, v in base_stats.items())  # route main trained it
    assert all(torch.equal(a, b) for a, b in zip(p.net.state_dict().values(), ref.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(p.patches.state_dict().values(), r["patches"].state_dict().values()))
    for a, b in zip([*p.net.parameters(), *p.patches.parameters()], [*ref.parameters(), *r["patches"].parameters()]):
        assert torch.equal(a.grad, b.grad)


def test_copies_of_the_base_drop_the_twins():
    net = _net()
    bare = copy.deepcopy(net)
    p = _patched(net)
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(p.base_copy().net(x), bare(x))
        assert not any("forward" in m.__dict__ for m in p.base_copy().modules())
        twin = AuxBN.from_module(p.net.get_submodule("1")).twin  # a twin of a twinned layer: the layer alone
        assert "forward" not in twin.__dict__ and torch.equal(twin(x.repeat(1, 4, 1, 1)), bare[1](x.repeat(1, 4, 1, 1)))
        c = p.clone()
        with torch.no_grad():
            c.patches["1"].twin.weight.mul_(3)
        assert torch.equal(p.model.net(x), _reference(p)[0](x))  # the clone's twin is its own
        assert not torch.equal(c.model.net(x), p.model.net(x))
        assert "forward" in c.net.get_submodule("1").__dict__


def _old_fixer(f, h):
    z = f.conv2(F.relu(f.conv1(h)))
    if f.conv2_up is not None:
        z = f.conv2_up(z)
    out = h + (f.strength * f.config.delta) * (f._act(z) - f._act0)
    return F.relu(out) if f.config.final_relu else out


def _old_token_fixer(f, h):
    out = h + (f.strength * f.config.delta) * (f._act(f.fc2(F.gelu(f.fc1(f.norm(h))))) - f._act0)
    return F.relu(out) if f.config.final_relu else out


def _old_prefilter(f, x):
    h = f.conv2(F.relu(f.conv1(x)))
    h = F.relu(f.conv2_pw(h) if f.design == "separable" else h)
    if f.design == "shuffle":
        g = F.pixel_shuffle(f.conv3(h), f.stride)[..., :x.shape[-2], :x.shape[-1]]
    else:
        if f.stride != 1:
            h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
        g = f.conv3(h)
    return x + (f.strength * f.delta) * g


def _same_forward_and_backward(patch, old, x):
    with torch.no_grad():
        for t in patch.parameters():
            t.add_(0.3 * torch.randn_like(t))  # trained: the last layer no longer zero
    outs, grads = [], []
    for f in (patch, lambda t: old(patch, t)):
        xi = x.clone().requires_grad_(True)
        patch.zero_grad()
        y = f(xi)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad, *[t.grad.clone() for t in patch.parameters()]])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("strength,delta,rank,final_relu", [(1.0, 1.0, 0, False), (0.5, 1.0, 2, False),
                                                           (1.0, 0.3, 0, True), (0.0, 1.0, 0, False)])
def test_fixers_compute_what_they_did(act, strength, delta, rank, final_relu):
    torch.manual_seed(1)
    f = Fixer(4, FixerConfig(rho=2, delta=delta, act=act, final_relu=final_relu, rank=rank))
    f.strength = strength
    _same_forward_and_backward(f, _old_fixer, torch.randn(3, 4, 5, 5).abs() if final_relu else torch.randn(3, 4, 5, 5))
    t = TokenFixer(8, FixerConfig(rho=2, delta=delta, act=act, final_relu=final_relu))
    t.strength = strength
    _same_forward_and_backward(t, _old_token_fixer, torch.randn(2, 5, 8))


@pytest.mark.parametrize("design,stride", [("plain", 1), ("plain", 2), ("separable", 1), ("shuffle", 2)])
@pytest.mark.parametrize("strength,delta", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0)])
def test_prefilters_compute_what_they_did(design, stride, strength, delta, monkeypatch):
    """In the base's layout, to the bit (the channels-last layout changes the order of the sums: the next test)."""
    monkeypatch.setattr(Prefilter, "channels_last", False)
    torch.manual_seed(2)
    f = Prefilter(3, width=4, delta=delta, stride=stride, design=design)
    f.strength = strength
    _same_forward_and_backward(f, _old_prefilter, torch.randn(2, 3, 7, 7))


@pytest.mark.parametrize("design,stride", [("plain", 1), ("plain", 2), ("separable", 1), ("shuffle", 2)])
@pytest.mark.parametrize("channels", [1, 3])
def test_prefilter_channels_last_computes_the_same_in_the_bases_layout(design, stride, channels, monkeypatch):
    """On the CPU the pre-filter's hidden layers run channels-last (faster thin convolutions at large batches):
    outputs and gradients as in NCHW up to float rounding, handed back in the input's NCHW layout; untrained or at
    strength 0 it still returns its input exactly."""
    torch.manual_seed(3)
    f = Prefilter(channels, width=16, stride=stride, design=design)
    x = torch.randn(Prefilter.CHANNELS_LAST_BATCH, channels, 9, 9)
    assert torch.equal(f(x), x)  # zero-initialised last layer: the base's input, to the bit
    with torch.no_grad():
        for t in f.parameters():
            t.add_(0.3 * torch.randn_like(t))
    runs, seen = [], []
    f.conv2.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].is_contiguous(
        memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    for layout in (False, True):
        monkeypatch.setattr(Prefilter, "channels_last", layout)
        xi = x.clone().requires_grad_(True)
        f.zero_grad()
        y = f(xi)
        y.square().sum().backward()
        assert y.is_contiguous()
        runs.append([y.detach(), xi.grad, *[t.grad.clone() for t in f.parameters()]])
    assert seen == [False, True]  # the hidden layers ran channels-last only when asked
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(*runs):  # gradients: a ReLU input within rounding of 0 may take the other side of its kink
        assert (b - a).norm() <= 1e-4 * a.norm(), (b - a).norm() / a.norm()
    f.strength = 0.0
    assert torch.equal(f(x), x)


@pytest.mark.parametrize("batch,width,channels_last", [(1, 16, False), (15, 16, False), (16, 16, True), (1, 64, True)])
def test_prefilter_runs_channels_last_where_it_was_measured_faster(batch, width, channels_last):
    """Channels-last from batch 16 on, or at width 64 and more: at batch 1 and width 16 the two layout copies cost
    more than the thinner convolutions save (issue 30: 131 µs NCHW against 158 µs)."""
    f = Prefilter(1, width=width)
    seen = []
    f.conv2.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].is_contiguous(
        memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    y = f(torch.randn(batch, 1, 6, 6))
    assert seen == [channels_last] and y.is_contiguous()
