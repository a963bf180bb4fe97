"""Frozen means frozen: base bit-identical, exact reproduction at zero strength, only patches train."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hardener
from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import ACTIVATIONS, Fixer, FixerConfig, PatchedModel
from hardener.training import fit as F

from conftest import ARCH, FAST_PATCH, make_data, trained_tiny


def _patched(act: str = "linear", sites=("features", "block"), final_relu: bool = False) -> PatchedModel:
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    for s in sites:
        p.attach(s, Fixer(8, FixerConfig(act=act, final_relu=final_relu)))
    return p


def _toy(n: int = 40):
    imgs, labels = make_data(n=n, seed=3)
    return hdata.Dataset(imgs, labels, source="toy")


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_fresh_patch_reproduces_base_exactly(act):
    p = _patched(act, final_relu=False)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        patched = p(x)
        with p.patches_disabled():
            base = p(x)
    assert torch.equal(patched, base)


def test_final_relu_on_nonnegative_site_reproduces_base():
    p = _patched(sites=("features",), final_relu=True)  # features ends in a ReLU
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        a = p(x)
        with p.patches_disabled():
            b = p(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("adversary,augment,norm", [("base", False, "Linf"), ("patched", False, "Linf"),
                                                    ("base", True, "L2")])
def test_fit_keeps_base_bit_identical_and_trains_only_patches(adversary, augment, norm):
    p = _patched()
    base_before = {k: v.clone() for k, v in p.base_state_dict().items()}
    patch_before = {k: v.clone() for k, v in p.patch_state_dict().items()}
    spec = A.AttackSpec("apgd", eps=0.1 if norm == "Linf" else 0.5, norm=norm, steps=3, n_classes=3)
    F.fit(p, _toy(), spec, F.FitConfig(epochs=2, batch_size=16, adversary=adversary, augment=augment),
          torch.device("cpu"))
    after = p.base_state_dict()
    assert after.keys() == base_before.keys()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), k  # parameters and BN buffers alike
    assert all(not m.training for m in p.net.modules()), "base modules left in train mode"
    changed = [k for k, v in p.patch_state_dict().items() if not torch.equal(v, patch_before[k])]
    assert changed, "no patch parameter trained"


def test_zero_strength_trained_patch_reproduces_base():
    p = _patched()
    F.fit(p, _toy(), A.AttackSpec("fgsm", eps=0.1, n_classes=3), F.FitConfig(epochs=2, batch_size=16),
          torch.device("cpu"))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        p.set_strength(0.0)
        zero = p(x)
        with p.patches_disabled():
            base = p(x)
    assert torch.equal(zero, base)


def test_patch_output_is_trained_to_differ():
    p = _patched()
    F.fit(p, _toy(), A.AttackSpec("fgsm", eps=0.1, n_classes=3), F.FitConfig(epochs=3, batch_size=16, lr=1e-2),
          torch.device("cpu"))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        a = p(x)
        with p.patches_disabled():
            b = p(x)
    assert not torch.equal(a, b)


def test_torchattacks_train_call_keeps_base_in_eval():
    p = _patched()
    p.train()  # what torchattacks does after attacking a training model
    assert all(not m.training for m in p.net.modules())
    assert all(m.training for m in p.patches.modules())


def test_cli_patch_writes_bit_identical_base(patched_ckpt, tiny_ckpt):
    src = load_file(str(tiny_ckpt))
    out = load_file(str(patched_ckpt))
    for k, v in src.items():
        assert torch.equal(out[k], v), k
    extra = set(out) - set(src)
    assert extra and all(k.startswith("harden.") for k in extra)


def test_cli_patch_adversary_patched_keeps_base(tmp_path, tiny_ckpt, tiny_data, runner):
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                             "--at", "block", "--adversary", "patched", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    src, got = load_file(str(tiny_ckpt)), load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in src.items())


def test_load_gives_same_logits_as_in_memory(tmp_path, tiny_ckpt, tiny_data):
    from hardener.io.checkpoint import Manifest, save_patched

    p = _patched()
    F.fit(p, _toy(), A.AttackSpec("fgsm", eps=0.1, n_classes=3), F.FitConfig(epochs=1, batch_size=16, lr=1e-2),
          torch.device("cpu"))
    path = tmp_path / "m.safetensors"
    save_patched(path, p, Manifest(arch=ARCH, arch_kwargs={}, input=p.model.spec.to_json(),
                                   patches=p.patch_specs(), base_sha256="0" * 64))
    loaded = hardener.load(path, arch=ARCH)
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), p(x))


def test_cli_output_loads_and_exports_torchscript(tmp_path, patched_ckpt, runner):
    model = hardener.load(patched_ckpt, arch=ARCH)
    ts = tmp_path / "m.ts.pt"
    r = runner.invoke(main, ["export", str(patched_ckpt), "--arch", ARCH, "--out", str(ts)])
    assert r.exit_code == 0, r.output
    x = torch.rand(6, 1, 8, 8)
    # run the TorchScript file in a fresh interpreter without harden on the path
    code = ("import torch,sys; m=torch.jit.load(sys.argv[1]); x=torch.load(sys.argv[2]); "
            "torch.save(m(x), sys.argv[3])")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-I", "-c", code, str(ts), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(x))


def test_manifest_file_arch_needs_trust(patched_ckpt):
    from hardener.errors import InputError

    with pytest.raises(InputError, match="trust_arch=True"):
        hardener.load(patched_ckpt)
    assert hardener.load(patched_ckpt, trust_arch=True) is not None


def test_same_seed_gives_byte_identical_checkpoint(tmp_path, tiny_ckpt, tiny_data, runner):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                                 "--at", "block", "--out", str(out), *FAST_PATCH])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
