"""harden predict and inference-time post-training (adaptive-post-training-at-inference.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.evaluation.adaptive import AdaptiveConfig, AdaptivePredictor
from hardener.io.checkpoint import sha256_file
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import Fixer, FixerConfig, PatchedModel

from conftest import ARCH, assert_input_error, make_data, trained_tiny


def _patched() -> PatchedModel:
    torch.manual_seed(0)
    p = PatchedModel(Classifier(trained_tiny(steps=120), InputSpec(shape=[1, 8, 8])))
    p.attach("block", Fixer(8, FixerConfig()))
    return p


def _reference() -> hdata.Dataset:
    imgs, labels = make_data(n=120, seed=11)
    return hdata.Dataset(imgs, labels, source="ref")


def test_neighbour_accuracy_on_adversarial_inputs():
    p = _patched()
    imgs, labels = make_data(n=60, seed=5)
    x, y = imgs.float() / 255, labels
    spec = A.AttackSpec("pgd", eps=0.25, steps=10, n_classes=3)
    adv = A.project(x, A.build(p, spec)(x, y), spec.eps, spec.norm)
    with torch.no_grad():
        fooled = p(adv).argmax(1) != y
    assert fooled.float().mean() > 0.5  # the inputs are really adversarial
    pred = AdaptivePredictor(p, _reference(), AdaptiveConfig(eps=0.25, iterations=0), torch.device("cpu"))
    hits = []
    for i in range(len(y)):
        y1, y2, _ = pred.neighbour(adv[i:i + 1])
        hits.append(int(y[i]) in (y1, y2))
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_adapt_patches_changes_only_patch_parameters_of_the_copy():
    p = _patched()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    pred = AdaptivePredictor(p, _reference(), AdaptiveConfig(eps=0.25, iterations=3, batch=16, post_train="pgd"),
                             torch.device("cpu"))
    x = torch.rand(1, 1, 8, 8)
    y1, y2, x2 = pred.neighbour(x)
    copy_ = pred.post_train(x, y1, (y1 + 1) % 3, x2, torch.Generator().manual_seed(0))
    after = copy_.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("patches.") for k in changed), changed
    for k, v in p.state_dict().items():  # the stored model is untouched
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # and the copy really answers with its own patches
        assert not torch.equal(copy_(x), p(x))


def test_adapt_patches_needs_patches():
    plain = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    from hardener.errors import InputError
    with pytest.raises(InputError, match="--adapt all"):
        AdaptivePredictor(plain, _reference(), AdaptiveConfig(), torch.device("cpu"))


def test_cli_predict_plain_and_adaptive(runner, patched_ckpt, tmp_path):
    imgs, labels = make_data(n=12, seed=21)
    unlabelled = tmp_path / "inputs.npz"
    np.savez(unlabelled, images=imgs.numpy())
    ref = tmp_path / "ref.npz"
    r_imgs, r_labels = make_data(n=60, seed=22)
    np.savez(ref, images=r_imgs.numpy(), labels=r_labels.numpy())
    sha = sha256_file(patched_ckpt)
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(unlabelled), "--quiet"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 12 and all(len(line.split("\t")) == 3 for line in lines)
    args = ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(unlabelled), "--adaptive", "--reference-data",
            str(ref), "--eps", "0.2", "--iterations", "3", "--post-batch", "8", "--json", "--quiet", "--seed", "3"]
    runs = []
    for _ in range(2):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
        assert len(rows) == 12 and {"prediction", "original_class", "neighbour_class", "post_trained",
                                    "seconds"} <= set(rows[0])
        runs.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    assert runs[0] == runs[1]  # deterministic for a seed
    assert sha256_file(patched_ckpt) == sha  # the checkpoint never changes
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(unlabelled), "--adaptive"])
    assert r.exit_code == 2 and "--reference-data" in r.output


def test_cli_eval_defense_adaptive(runner, patched_ckpt, tiny_test_data, tiny_data, tmp_path):
    rep = tmp_path / "adaptive.json"
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--max-samples",
                             "9", "--defense", "adaptive", "--reference-data", str(tiny_data), "--eps", "0.2",
                             "--steps", "3", "--iterations", "2", "--post-batch", "8", "--e2e-samples", "2",
                             "--e2e-steps", "2", "--report", str(rep), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(rep.read_text())
    assert res["schema"] == "harden.adaptive-report/1" and res["n"] == 9
    assert set(res["threat_models"]) == {"static_transfer", "end_to_end"}
    assert res["end_to_end"]["n"] == 2 and "BPDA" in res["end_to_end"]["method"]
    for key in ("clean", "robust_static_transfer", "neighbour_accuracy_adversarial"):
        assert 0 <= res["adaptive_predictor"][key]["accuracy"] <= 1
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--defense",
                             "adaptive", "--reference-data", str(tiny_data), "--report", str(tmp_path / "a.md")])
    assert_input_error(r, "JSON")
