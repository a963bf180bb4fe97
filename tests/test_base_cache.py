"""`harden eval --base-cache`: the base's share of an evaluation is computed once and reused, and
reusing it changes no number."""
from __future__ import annotations

import json

import pytest

from hardener.cli.app import main

from conftest import ARCH, FAST_PATCH

EVAL = ["--attack", "apgd-ce,fgsm,square", "--steps", "3", "--queries", "30", "--eps", "0.2", "--threat", "all",
        "--batch-size", "8", "--no-checks", "--quiet", "--json"]


def _numbers(rep: dict) -> dict:
    """The report's models without timings (the only thing a cache may change)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "images_per_s")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    return strip(rep["models"])


def _eval(runner, model, data, *extra) -> dict:
    r = runner.invoke(main, ["eval", str(model), "--arch", ARCH, "--data", str(data), *EVAL, *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def second_patched(tmp_path_factory, tiny_ckpt, tiny_data):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("patched2") / "tiny.other.safetensors"
    r = CliRunner().invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data),
                                  "--subset", "0.5", "--at", "block", "--seed", "3", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    return out


def test_base_cache_reuses_base_rows_and_transfer_examples_without_changing_numbers(
        runner, tmp_path, patched_ckpt, second_patched, tiny_test_data):
    cache = tmp_path / "cache"
    plain1 = _eval(runner, patched_ckpt, tiny_test_data)
    plain2 = _eval(runner, second_patched, tiny_test_data)
    first = _eval(runner, patched_ckpt, tiny_test_data, "--base-cache", str(cache))
    second = _eval(runner, second_patched, tiny_test_data, "--base-cache", str(cache))
    # identical numbers with and without the cache, for the model that filled it and the one that reused it
    assert _numbers(first) == _numbers(plain1)
    assert _numbers(second) == _numbers(plain2)
    assert first["base_cache"]["base_rows_reused"] is False
    assert first["base_cache"]["transfer_batches_computed"] > 0
    assert second["base_cache"]["base_rows_reused"] is True
    assert second["base_cache"]["transfer_batches_reused"] > 0
    assert second["base_cache"]["dir"] == first["base_cache"]["dir"]
    # the same model again: nothing of the base's is computed
    again = _eval(runner, patched_ckpt, tiny_test_data, "--base-cache", str(cache))
    assert again["base_cache"]["transfer_batches_computed"] == 0 and again["base_cache"]["base_rows_reused"]
    assert _numbers(again) == _numbers(plain1)
    assert "base_cache" not in plain1


def test_base_cache_key_follows_settings_and_base(runner, tmp_path, patched_ckpt, tiny_ckpt, tiny_test_data):
    cache = tmp_path / "cache"
    a = _eval(runner, patched_ckpt, tiny_test_data, "--base-cache", str(cache))
    b = _eval(runner, patched_ckpt, tiny_test_data, "--base-cache", str(cache), "--eps", "0.1")
    assert a["base_cache"]["dir"] != b["base_cache"]["dir"] and not b["base_cache"]["base_rows_reused"]
    # another base (the tiny model trained from another seed) under the same settings: a new entry
    from safetensors.torch import save_file

    from conftest import trained_tiny

    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in trained_tiny(seed=5).state_dict().items()}, str(other))
    c = _eval(runner, other, tiny_test_data, "--base-cache", str(cache))
    assert c["base_cache"]["dir"] != a["base_cache"]["dir"] and not c["base_cache"]["base_rows_reused"]


def test_base_cache_folder_that_cannot_be_made_is_an_input_error(runner, tmp_path, patched_ckpt, tiny_test_data):
    from conftest import assert_input_error

    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), *EVAL,
                             "--base-cache", str(blocker / "sub")])
    assert_input_error(r, "--base-cache")


def test_base_cache_is_shared_with_fully_fine_tuned_models_of_the_same_parent(
        runner, tmp_path, tiny_ckpt, tiny_data, patched_ckpt, tiny_test_data):
    cache = tmp_path / "cache"
    first = _eval(runner, patched_ckpt, tiny_test_data, "--base-cache", str(cache))
    full = tmp_path / "adv.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--method", "adv-train", "--out", str(full), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    plain = _eval(runner, full, tiny_test_data, "--parent", str(tiny_ckpt))
    cached = _eval(runner, full, tiny_test_data, "--parent", str(tiny_ckpt), "--base-cache", str(cache))
    assert cached["base_cache"]["dir"] == first["base_cache"]["dir"] and cached["base_cache"]["base_rows_reused"]
    assert _numbers(cached) == _numbers(plain)
