"""`--preset light` (issue 30): the robust recipe's sites sized to --budget 1.25, BN twins, distilled with RSLAD from a
heavy patch of the same base (`--teacher`), at a lower μ than the robust recipe's."""
from __future__ import annotations

import pytest

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import read_manifest, sha256_file
from hardener.options.patch_options import PatchOptions
from hardener.options.recipe import load_preset

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def test_the_light_preset_is_the_robust_recipe_sized_to_a_budget_and_distilled():
    light, robust = load_preset("light").options, load_preset("robust").options
    assert light["at"] == robust["at"] and light["adversary"] == robust["adversary"] == "patched"
    assert light["budget"] == 1.25 and light["loss_name"] == "rslad" and light["bn"] == "auto"
    assert light["mu"] < robust["mu"]  # the teacher, not the base, holds clean accuracy
    opts, preset = PatchOptions.build("light", {"teacher": "heavy.safetensors"})
    assert preset.name == "light" and opts.budget == 1.25 and opts.loss_name == "rslad" and opts.epochs == 20


def test_without_a_teacher_it_says_how_to_make_one_in_each_voice(runner, tiny_ckpt, tiny_data, tmp_path):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--preset", "light",
                             "--out", str(tmp_path / "x.safetensors")])
    assert_input_error(r, "--preset light distils a heavy patch", "--preset robust", "with --teacher")
    imgs, labels = make_data(n=30)
    with pytest.raises(InputError, match=r"^recipe='light' distils a heavy patch .*recipe='robust'.* teacher=$"):
        hardener.patch(trained_tiny(), (imgs, labels), "light", progress=False)
    # a loss given by the caller keeps the plain rslad error
    with pytest.raises(InputError, match=r"^loss='rslad' distils from a robust teacher"):
        hardener.patch(trained_tiny(), (imgs, labels), None, loss="rslad", progress=False)


def test_light_distils_the_heavy_patch_within_its_budget(runner, tiny_ckpt, tiny_data, patched_ckpt, tmp_path):
    out = tmp_path / "light.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                             "--select-on", "15", "--preset", "light", "--teacher", str(patched_ckpt),
                             "--budget", "3", "--out", str(out), *FAST_PATCH])  # the tiny base: 1.25x fits nothing
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m.training["preset"]["name"] == "light" and m.training["config"]["loss"] == "rslad"
    assert m.training["teacher"] == {"file": patched_ckpt.name, "sha256": sha256_file(patched_ckpt)}
    assert m.cost["macs_ratio"] <= 3.0
    kinds = {p["kind"] for p in m.patches}
    assert "auxbn" in kinds and kinds & {"prefilter", "fixer"}
