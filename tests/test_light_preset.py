"""`--preset light` (issue 30): a pre-filter sized to --budget 1.25, lora deltas on every conv and linear layer, BN
twins, 20 epochs at a lower μ than the robust recipe's; one stage (no teacher), and a heavy patch can still be
distilled into it."""
from __future__ import annotations

import warnings

import pytest

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import read_manifest, sha256_file
from hardener.options.patch_options import PatchOptions
from hardener.options.recipe import load_preset

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def test_the_light_preset_is_a_prefilter_sized_to_a_budget_beside_lora_deltas():
    light, robust = load_preset("light").options, load_preset("robust").options
    assert light["at"] == "prefilter:input,lora:auto" and light["lora_rank"] == 8 and light["width"] == 16
    assert light["adversary"] == robust["adversary"] == "patched"
    assert light["loss_name"] == robust["loss_name"] and light["budget"] == 1.25 and light["bn"] == "auto"
    assert light["mu"] < robust["mu"] and light["epochs"] > robust["epochs"]
    opts, preset = PatchOptions.build("light", {})  # no teacher needed
    assert preset.name == "light" and opts.budget == 1.25 and opts.teacher is None and opts.epochs == 20


def test_light_trains_within_its_budget_without_a_teacher(runner, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "light.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                             "--select-on", "15", "--preset", "light", "--budget", "3", "--out", str(out),
                             *FAST_PATCH])  # the tiny base: 1.25x fits nothing
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m.training["preset"]["name"] == "light" and m.training["config"]["loss"] == "fixer"
    assert "teacher" not in m.training and m.cost["macs_ratio"] <= 3.0
    assert m.cost["budget"] == 3.0 and m.cost["sizing"].startswith("--budget 3: ")  # what was asked, what it chose
    kinds = {p["kind"] for p in m.patches}
    assert {"auxbn", "lora", "prefilter"} <= kinds and "fixer" not in kinds
    assert "lora delta(s) kept" in m.cost["sizing"]


def test_light_distils_a_heavy_patch_when_given_one(patched_ckpt):
    imgs, labels = make_data(n=60)
    with warnings.catch_warnings():  # the latency past the budget a thin patch may measure on the tiny base
        warnings.simplefilter("ignore", UserWarning)
        light = hardener.patch(trained_tiny(), (imgs, labels), "light", loss="rslad", teacher=str(patched_ckpt),
                               budget=3, epochs=1, steps=1, eps=0.1, batch_size=32, select_on=10, progress=False)
    rec = light.training_record
    assert rec["preset"]["name"] == "light" and rec["config"]["loss"] == "rslad"
    assert rec["teacher"] == {"file": patched_ckpt.name, "sha256": sha256_file(patched_ckpt)}
    assert light.cost.macs_ratio <= 3.0
    # rslad asked of the light preset without a teacher: the plain rslad error, in the library's words
    with pytest.raises(InputError, match=r"^loss='rslad' distils from a robust teacher"):
        hardener.patch(trained_tiny(), (imgs, labels), "light", loss="rslad", progress=False)


def test_light_with_rslad_and_no_teacher_exits_2_with_the_plain_rslad_line(runner, tiny_ckpt, tiny_data, tmp_path):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--preset", "light",
                             "--loss", "rslad", "--out", str(tmp_path / "x.safetensors")])
    assert_input_error(r, "--loss rslad distils from a robust teacher", "pass --teacher")
