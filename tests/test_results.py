"""Issue 31 item 3: typed evaluation results (`hardener.reports.results`), the masks as fields; saved results keep the dict
format of before (`to_state`/`from_state` at the base cache and the resumable state), the report's JSON is their
public fields."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hardener import data as hdata
from hardener.evaluation import threats as E
from hardener.reports import report as R
from hardener.reports.results import AttackRow, EvalResult, ModelResult
from hardener.reports.results import equal as same


def private_free(obj):
    """What the report showed before the results were typed: the saved dict less its private keys."""
    if isinstance(obj, dict):
        return {k: private_free(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [private_free(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from conftest import make_data, tiny_with_a_fixer

    p = tiny_with_a_fixer()
    imgs, labels = make_data(n=40, seed=11)
    cfg = E.EvalConfig(attacks=["fgsm", "pgd", "square"], eps=0.15, steps=3, queries=20, checks=False, batch_size=16,
                       threats=("whitebox", "transfer", "blackbox"))
    cache = tmp_path_factory.mktemp("cache")
    res = E.evaluate(p, hdata.Dataset(imgs, labels, source="toy"), cfg, torch.device("cpu"), has_patches=True,
                     base_cache=cache)
    return res, next(cache.glob("*/base.pt"))


def test_results_convert_to_the_saved_dict_and_back_unchanged(evaluated):
    res, _ = evaluated
    assert isinstance(res, EvalResult) and set(res.models) == {"base", "patched"}
    m = res.models["patched"]
    assert isinstance(m.threats["whitebox"].attacks[0], AttackRow) and m.threats["whitebox"].mask.dtype == torch.bool
    assert not same(m.worst_mask, m.clean_mask)  # the attacks broke something: the masks below are not trivial
    assert EvalResult.from_state(res.to_state()) == res
    assert same(EvalResult.from_state(res.to_state()), res)
    state = m.to_state()  # the format of before: masks under "_masks" (clean, worst, each threat, worst_whitebox)
    assert list(state["_masks"]) == ["clean", "worst", "whitebox", "transfer", "blackbox", "worst_whitebox"]
    assert all("_after" in r for th in state["threats"].values() for r in th["attacks"])
    assert same(ModelResult.from_state(state).to_state(), state)
    # the typed result does not hide a difference: another mask is another result
    other = dataclasses.replace(m, worst_mask=~m.worst_mask)
    assert ModelResult.from_state(other.to_state()) != m and not same(other.to_state(), m.to_state())
    assert not same(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.uint8))  # a mask is a bool tensor
    assert not same({"a": 1, "b": 2}, {"b": 2, "a": 1})  # the saved order counts


def test_the_base_cache_file_holds_the_dict_format(evaluated):
    res, base_pt = evaluated
    saved = torch.load(base_pt, map_location="cpu", weights_only=True)["result"]
    assert isinstance(saved, dict) and torch.equal(saved["_masks"]["clean"], res.models["base"].clean_mask)
    # as saved before the figures on the base's correct samples were added to it
    assert same(saved, dataclasses.replace(res.models["base"], correct_by_base=None).to_state())


def test_the_report_json_is_the_public_fields(evaluated):
    res, _ = evaluated
    rep = R.build("eval", res, {"n": res.n}, R.attack_settings(res), {}, {"eps": 0.15, "norm": "Linf"})
    assert rep["models"] == {k: private_free(m.to_state()) for k, m in res.models.items()}
    assert "worst_whitebox" in rep["models"]["patched"] and "threats_skipped" not in rep["models"]["patched"]
    assert '"_masks"' not in R.json_text(rep) and '"_after"' not in R.json_text(rep)


def test_a_sealed_base_cache_entry_of_another_shape_is_refused(tmp_path):
    from hardener.errors import InputError

    from conftest import trained_tiny

    net = trained_tiny().eval()
    cfg = E.EvalConfig(attacks=["fgsm"], eps=0.1, batch_size=8)
    cache = E.BaseCache(tmp_path, net, net.state_dict(), torch.rand(12, 1, 8, 8), "data", cfg, torch.device("cpu"))
    cache.save_base({"_masks": {"clean": torch.ones(12, dtype=torch.bool)}, "clean": 1.0})
    assert cache.load_base()["clean"] == 1.0  # the file reads back as it was written
    with pytest.raises(InputError, match="is not a file harden wrote: delete it"):
        cache.load_result()
