"""`--twin-stats` (issue 30): how BN twins normalise while training. batch: each input by its own batch's statistics;
joint: the clean and adversarial inputs in one batch; frozen: the base's running statistics, only affine parameters
learn."""
from __future__ import annotations

import pytest
import torch

import hardener
from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import read_manifest
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import AuxBN, PatchedModel, select_bn_sites
from hardener.training import fit as F

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def _twinned() -> PatchedModel:
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    for site in select_bn_sites(p.net, "all"):
        p.attach(site, AuxBN.from_module(p.net.get_submodule(site)))
    return p


def _fit(p: PatchedModel, twin_stats: str, epochs: int = 2) -> None:
    imgs, labels = make_data(n=32, seed=3)
    F.fit(p, hdata.Dataset(imgs, labels, source="toy"), A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3),
          F.FitConfig(epochs=epochs, batch_size=16, adversary="patched", mu=0, lam=0, twin_stats=twin_stats),
          torch.device("cpu"))


def _twins(p: PatchedModel) -> dict[str, AuxBN]:
    return {s: p.patches[k] for s, k in p.sites.items() if isinstance(p.patches[k], AuxBN)}


def test_frozen_twins_keep_the_base_statistics_and_learn_their_affine_parameters():
    p = _twinned()
    base = {k: v.clone() for k, v in p.base_state_dict().items()}
    before = {s: (t.twin.weight.clone(), t.twin.bias.clone()) for s, t in _twins(p).items()}
    _fit(p, "frozen")
    assert all(torch.equal(v, base[k]) for k, v in p.base_state_dict().items())  # frozen means frozen
    for site, patch in _twins(p).items():
        bn = p.net.get_submodule(site)
        assert torch.equal(patch.twin.running_mean, bn.running_mean), site  # never updated
        assert torch.equal(patch.twin.running_var, bn.running_var), site
        assert int(patch.twin.num_batches_tracked) == int(bn.num_batches_tracked), site
    assert any(not torch.equal(t.twin.weight, before[s][0]) or not torch.equal(t.twin.bias, before[s][1])
               for s, t in _twins(p).items())


def _train_batches(p: PatchedModel, twin_stats: str) -> list[int]:
    """The batch sizes the first twin normalised in training mode (its batch statistics) during a fit."""
    twin = next(iter(_twins(p).values())).twin
    seen: list[int] = []
    hook = twin.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])) if m.training else None)
    try:
        _fit(p, twin_stats, epochs=1)
    finally:
        hook.remove()
    return seen


def test_joint_twins_normalise_clean_and_adversarial_inputs_as_one_batch():
    assert _train_batches(_twinned(), "batch") == [16, 16, 16, 16]  # two steps, clean and adversarial apart
    assert _train_batches(_twinned(), "joint") == [32, 32]  # two steps, one batch of both
    assert _train_batches(_twinned(), "frozen") == []  # eval mode throughout: the running statistics


def test_joint_running_statistics_are_those_of_the_shared_batch():
    p = _twinned()
    patch = next(iter(_twins(p).values()))
    patch.twin.momentum = 1.0  # the running statistics are the last training batch's
    inputs: list[torch.Tensor] = []
    hook = patch.twin.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()) if m.training else None)
    _fit(p, "joint", epochs=1)
    hook.remove()
    last = inputs[-1]
    assert len(last) == 32
    assert torch.allclose(patch.twin.running_mean, last.mean((0, 2, 3)), atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")  # one optimiser step, no arch: what this test wants
def test_twin_stats_is_recorded_and_reaches_the_library(tmp_path):
    imgs, labels = make_data(n=60)
    out = tmp_path / "frozen.safetensors"
    m = hardener.patch(trained_tiny(), (imgs, labels), method="fixer,auxbn", bn="all", twin_stats="frozen",
                       epochs=1, steps=1, eps=0.1, batch_size=32, progress=False)
    assert m.training_record["config"]["twin_stats"] == "frozen"
    m.save(out)
    assert read_manifest(out).training["config"]["twin_stats"] == "frozen"
    # the default records nothing: a run that does not use the option writes, and resumes from, what it did before
    plain = hardener.patch(trained_tiny(), (imgs, labels), method="fixer,auxbn", bn="all", epochs=1, steps=1, eps=0.1,
                           batch_size=32, progress=False)
    assert "twin_stats" not in plain.training_record["config"]
    with pytest.raises(InputError, match=r"twin_stats"):
        hardener.patch(trained_tiny(), (imgs, labels), twin_stats="sideways", progress=False)


@pytest.mark.parametrize("args, needles", [
    (["--twin-stats", "frozen"], ["--twin-stats frozen", "has no", "add auxbn"]),
    (["--method", "advprop", "--twin-stats", "joint"], ["--twin-stats joint", "advprop", "batch or frozen"]),
])
def test_twin_stats_errors_exit_2(args, needles, runner, tiny_ckpt, tiny_data, tmp_path):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), *args,
                             "--out", str(tmp_path / "x.safetensors"), *FAST_PATCH])
    assert_input_error(r, *needles)


def test_cli_trains_joint_twins_end_to_end(runner, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "joint.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                             "--method", "fixer,auxbn", "--bn", "all", "--adversary", "patched",
                             "--twin-stats", "joint", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert read_manifest(out).training["config"]["twin_stats"] == "joint"
