"""--ema: an exponential moving average of the trained patch weights is what is validated, kept and written."""
from __future__ import annotations

import json

import pytest
import torch

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.patches import PatchedModel
from hardener.training import fit as F

from conftest import (
    ARCH,
    FAST_PATCH,
    assert_input_error,
    fresh_fixed,
    make_data,
    trained_tiny,
)

BASE = trained_tiny()


def _fresh() -> PatchedModel:
    return fresh_fixed(BASE)


def test_average_follows_its_formula():
    avg = F._Average(0.9)
    w = {"a": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    avg.update(w, 1)  # the first call copies
    w["a"].add_(10.0)  # the average holds copies, not the weights
    assert torch.equal(avg.state["a"], torch.tensor([1.0, 2.0]))
    avg.update({"a": torch.tensor([11.0, 12.0]), "n": torch.tensor(4)}, 2)
    d = min(0.9, 3 / 12)  # a short memory at first: (1 + t) / (10 + t)
    assert torch.allclose(avg.state["a"], d * torch.tensor([1.0, 2.0]) + (1 - d) * torch.tensor([11.0, 12.0]))
    assert int(avg.state["n"]) == 4  # integer buffers are copied
    avg.update({"a": torch.zeros(2), "n": torch.tensor(5)}, 1000)
    assert torch.allclose(avg.state["a"], 0.9 * (d * torch.tensor([1.0, 2.0]) + (1 - d) * torch.tensor([11.0, 12.0])))


def _train(ema: float, val: hdata.Dataset | None = None, select: bool = False) -> tuple[PatchedModel, list]:
    imgs, labels = make_data(n=48, seed=4)
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    cfg = F.FitConfig(epochs=3, batch_size=16, adversary="patched", ema=ema, select=select)
    p = _fresh()
    logs = F.fit(p, hdata.Dataset(imgs, labels), spec, cfg, torch.device("cpu"), val=val)
    return p, logs


def test_written_patch_is_the_average_and_the_base_stays_frozen():
    before = {k: v.clone() for k, v in _fresh().base_state_dict().items()}
    plain, _ = _train(0.0)
    tiny, _ = _train(1e-12)  # an average that forgets at once is the last weights
    averaged, _ = _train(0.9)
    for k, v in plain.patch_state_dict().items():
        assert torch.allclose(tiny.patch_state_dict()[k], v, atol=1e-6), k
    assert any(not torch.allclose(averaged.patch_state_dict()[k], v)
               for k, v in plain.patch_state_dict().items() if v.is_floating_point())
    for k, v in averaged.base_state_dict().items():
        assert torch.equal(v, before[k]), k


def test_validation_scores_the_average_and_selection_keeps_it():
    vi, vl = make_data(n=30, seed=9)
    val = hdata.Dataset(vi, vl)
    p, logs = _train(0.9, val=val, select=True)
    kept = F.selected_epoch(logs, F.FitConfig(select=True))
    clean = F._Validation(val, A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3), 64, torch.device("cpu"),
                          p)._accuracy(p.eval(), hdata.to_float(val.images))
    assert clean == pytest.approx(logs[kept - 1].val_clean)  # what was scored is what was kept


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_bad_ema_is_one_clear_line(runner, tmp_path, tiny_ckpt, tiny_data, value):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), *FAST_PATCH,
                             "--ema", value, "--out", str(tmp_path / "p.safetensors")])
    assert_input_error(r, "--ema")


def test_cli_ema_is_recorded(runner, tmp_path, tiny_ckpt, tiny_data):
    rep = tmp_path / "r.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), *FAST_PATCH,
                             "--ema", "0.9", "--out", str(tmp_path / "p.safetensors"), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["training"]["config"]["ema"] == 0.9
