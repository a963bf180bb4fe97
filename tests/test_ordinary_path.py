"""The ordinary path (issue 14): `harden patch MODEL --data SUBSET` with nothing else works, protects by default,
carves its own held-out split, says what it will cost, and writes files the way the user's umask says."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.options.recipe import load_preset, preset_names, split_for_training

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data


@pytest.fixture()
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _npz(path, n, classes=3, seed=3):
    imgs, labels = make_data(n=n, classes=classes, seed=seed)
    np.savez(path, images=imgs.numpy(), labels=labels.numpy())
    return path


def test_literal_patch_with_only_data_succeeds_and_records_the_split(runner, tiny_ckpt, tmp_path, umask022,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model.safetensors"
    model.write_bytes(tiny_ckpt.read_bytes())
    data = _npz(tmp_path / "subset.npz", 120)
    r = runner.invoke(main, ["patch", str(model), "--arch", ARCH, "--data", str(data), "--report", "r.json"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "model.hardened.safetensors"
    assert r.output.strip().splitlines()[-1] == str(out)
    # stderr (mixed in by CliRunner): the carved split, the plan, an estimate, progress lines, the full command
    assert "held out 24 of 120 images (stratified, seed 0" in r.output
    assert "plan: recipe: preset robust, training for the white-box threat model" in r.output
    assert "estimated time left: training" in r.output
    assert "10 epochs x 3 steps of 32 (--batch-size auto)" in r.output  # 96 images: 128 would be 10 steps
    assert "train 30/30 (100%)" in r.output  # not a TTY: plain progress lines
    # on this tiny base the width-64 pre-filter costs many times the base: said before training, with the way out
    warn = next(line for line in r.output.splitlines() if "multiply-adds per image," in line)
    assert warn.startswith("warning: the patches add ") and "--prefilter-stride 2 or --width 32" in warn
    assert r.output.index(warn) < r.output.index("train 1/30")
    assert "harden eval" in r.output and "quick check, not a verdict" in r.output
    m = hardener.load(out, arch=ARCH).manifest
    assert m.training["preset"]["name"] == "robust" and m.training["preset"]["threat_model"] == "white-box"
    assert m.training["threat_model"] == "white-box" and m.training["preset"]["overridden"] == []
    split = m.training["split"]
    assert split["carved"] == {"held_out": 24, "holdout": "20%"}
    assert (split["train"], split["validation"], split["report_pool"]) == (96, 12, 12)
    assert m.training["config"]["adversary"] == "patched"
    assert {p["kind"] for p in m.patches} == {"prefilter", "fixer"}
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["report_budget"]["budget"] == "quick" and not rep["report_budget"]["verdict"]
    assert rep["report_budget"]["full_evaluation"].startswith(f"harden eval {out}")
    assert rep["estimate"]["seconds"] > 0 and rep["train_seconds"] > 0
    # outputs follow the umask: 0644 under 022
    for p in (out, tmp_path / "r.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.hardened.safetensors", "model.safetensors", "r.json",
                                                          "subset.npz"]


@pytest.mark.parametrize("n,lonely,needle", [(40, False, "40 images"), (60, True, "class 2 has 1")])
def test_data_too_small_to_split_is_an_input_error(runner, tiny_ckpt, tmp_path, n, lonely, needle):
    imgs, labels = make_data(n=n, classes=3)
    if lonely:  # class 2 has a single image
        labels = labels % 2
        labels[0] = 2
    path = tmp_path / "small.npz"
    np.savez(path, images=imgs.numpy(), labels=labels.numpy())
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(path),
                             "--out", str(tmp_path / "o.safetensors")])
    assert_input_error(r, needle, "--eval-data")
    assert not (tmp_path / "o.safetensors").exists()


def test_split_is_stratified_seeded_and_disjoint():
    import torch

    labels = torch.arange(300) % 3
    a = split_for_training(labels, None, False, 500, "20%", 0)
    b = split_for_training(labels, None, False, 500, "20%", 0)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and torch.equal(a.rest, b.rest)
    allidx = torch.cat([a.train, a.val, a.rest])
    assert len(allidx) == 300 and len(torch.unique(allidx)) == 300
    assert torch.bincount(labels[a.val]).tolist() == [10, 10, 10]
    assert a.record["carved"]["held_out"] == 60 and a.record["validation"] == 30
    # a --subset that leaves images aside needs no carving; --eval-data and no selection needs none either
    assert split_for_training(labels, 0.5, False, 0, "20%", 0).record["carved"] is None
    assert split_for_training(labels, None, True, 0, "20%", 0).record["train"] == 300
    # the held-out part is capped at 1,000 images for a fraction, and a count is taken as given
    big = torch.arange(20000) % 10
    assert split_for_training(big, None, True, 500, "20%", 0).record["carved"]["held_out"] == 1000
    assert split_for_training(labels, None, True, 10, "50", 0).record["carved"]["held_out"] == 50
    with pytest.raises(InputError, match="--holdout"):
        split_for_training(labels, None, False, 0, "1.5", 0)


def test_presets_are_validated_files(tmp_path):
    assert {"robust", "transfer"} <= set(preset_names())
    known = {"method", "at", "epochs"}
    for name in preset_names():
        load_preset(name)  # every shipped preset is valid
    bad = tmp_path / "bad.toml"
    bad.write_text('threat_model = "white-box"\ncolour = "red"\n[options]\nepochs = 3\n')
    with pytest.raises(InputError, match="unknown key 'colour'"):
        load_preset("bad", known, path=bad)
    bad.write_text('threat_model = "white-box"\n[options]\nepoch = 3\n')
    with pytest.raises(InputError, match="unknown key 'epoch'"):
        load_preset("bad", known, path=bad)
    bad.write_text('threat_model = "unbreakable"\n[options]\n')
    with pytest.raises(InputError, match="threat_model"):
        load_preset("bad", known, path=bad)
    # every shipped preset names only real `harden patch` options
    names = {p.name for p in next(c for n, c in main.commands.items() if n == "patch").params}
    for name in preset_names():
        load_preset(name, names)


def test_recipe_options_switch_the_default_preset_off_and_transfer_says_so(runner, tiny_ckpt, tiny_data, tmp_path):
    fast = ["--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--epochs", "1", "--eval-samples", "10",
            "--eval-steps", "1", "--steps", "1", "--eps", "0.1"]
    out = tmp_path / "t.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast, "--preset", "transfer", "--out", str(out),
                             "--report", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    m = hardener.load(out, arch=ARCH).manifest
    assert m.training["preset"]["name"] == "transfer" and m.training["config"]["adversary"] == "base"
    rep = json.loads((tmp_path / "t.json").read_text())
    assert any("does not hold against an attacker who knows the patch" in w for w in rep["data"]["warnings"])
    out2 = tmp_path / "c.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast, "--at", "block", "--out", str(out2), "--quiet"])
    assert r.exit_code == 0, r.output
    m = hardener.load(out2, arch=ARCH).manifest
    assert m.training["preset"] is None and [p["site"] for p in m.patches] == ["block"]
    # --bn adds BN twins to the default recipe rather than replacing it
    out3 = tmp_path / "bn.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast, "--bn", "auto", "--out", str(out3), "--quiet"])
    assert r.exit_code == 0, r.output
    m = hardener.load(out3, arch=ARCH).manifest
    assert m.training["preset"]["name"] == "robust"
    assert {p["kind"] for p in m.patches} == {"prefilter", "fixer", "auxbn"}


def test_few_steps_warning_names_the_preset_only_for_its_own_epochs():
    """`--epochs 1` on the command line with the default recipe is the user's, not preset robust's (issue 21's bench
    printed "(--epochs 1 is preset robust's)" while the preset says 10)."""
    from hardener.training.fit import FitConfig
    from hardener.training.run import recipe_warnings as _recipe_warnings

    robust = load_preset("robust")
    few = [w for w in _recipe_warnings(robust, FitConfig(epochs=1, adversary="patched"), 128, epochs_given=True)
           if "optimiser steps" in w]
    assert few and "preset" not in few[0]
    few = [w for w in _recipe_warnings(robust, FitConfig(epochs=1, adversary="patched"), 128) if "optimiser" in w]
    assert few and "preset" not in few[0]  # 1 epoch came from elsewhere (harden.toml): not the preset's 10
    ten = robust.options["epochs"]
    few = [w for w in _recipe_warnings(robust, FitConfig(epochs=ten, adversary="patched"), 128) if "optimiser" in w]
    assert few and f"(--epochs {ten} is preset robust's)" in few[0]


def test_clock_estimates_from_timed_steps_and_measured_validation(monkeypatch):
    from hardener.training import fit as F

    now = [0.0]
    monkeypatch.setattr(F.time, "perf_counter", lambda: now[0])
    seen = []
    clock = F.Clock(steps_left=20, vals_left=2, step_units=10.0, val_units=50.0, on_estimate=seen.append)
    now[0] = 5.0  # the first step pays for allocation: not counted
    clock.step()
    for _ in range(3):
        now[0] += 1.0
        clock.step()
    assert len(seen) == 1 and seen[0]["timed_steps"] == 3
    est = seen[0]
    assert est["seconds_per_step"] == pytest.approx(1.0) and est["train_seconds"] == pytest.approx(16.0)
    # validation estimated from the unit cost (0.1 s per unit) until one has been measured
    assert est["validation_seconds"] == pytest.approx(2 * 50 * 0.1)
    now[0] += 30.0
    clock.validated(7.0)
    now[0] += 2.0  # a step that took 2 s (the validation time is not counted as step time)
    clock.step()
    est = clock.estimate()
    assert est["seconds_per_step"] == pytest.approx(5 / 4) and est["validation_seconds"] == pytest.approx(7.0)
    assert clock.eta_text() == F.fmt_seconds(est["seconds"])


def test_review_regressions_cli(runner, tiny_ckpt, tiny_data, tmp_path, monkeypatch):
    fast = ["--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--epochs", "1", "--eval-samples", "10",
            "--eval-steps", "1", "--steps", "1", "--eps", "0.1", "--quiet"]
    # --validate with the default recipe: the user's split replaces the preset's --select-on
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast, "--validate", "10", "--out", str(tmp_path / "v.st")])
    assert r.exit_code == 0, r.output
    # a preset overridden into another threat model does not carry the preset's warning
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast, "--preset", "transfer", "--adversary", "patched",
                             "--out", str(tmp_path / "t.st"), "--report", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "t.json").read_text())
    assert not any("does not hold" in w for w in rep["data"]["warnings"])
    assert rep["training"]["threat_model"] == "white-box"
    assert rep["training"]["preset"]["overridden"] == ["adversary", "epochs", "steps"]
    monkeypatch.setenv("HARDEN_PROGRESS_SECONDS", "5s")
    r = runner.invoke(main, ["patch", str(tiny_ckpt), *fast[:-1], "--out", str(tmp_path / "p.st")])
    assert_input_error(r, "HARDEN_PROGRESS_SECONDS")


@pytest.mark.parametrize("args,needle", [
    (["patch", "--holdout", "1.5"], "--holdout"),
    (["patch", "--noise-sigma", "-1"], "--noise-sigma"),
    (["patch", "--device", "gpu"], "--device"),
    (["eval", "--threat", "whitebox,bogus"], "--threat"),
    (["certify", "--report", "c.txt"], ".json or .md"),
    (["predict", "--smooth", "0.1", "--smooth-alpha", "2"], "--smooth-alpha"),
])
def test_new_options_refuse_bad_values_in_one_line(runner, tiny_ckpt, tiny_data, tmp_path, args, needle):
    r = runner.invoke(main, [args[0], str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), *args[1:],
                             *(["--out", str(tmp_path / "o.st")] if args[0] == "patch" else [])])
    assert_input_error(r, needle)


def test_patch_help_says_what_the_default_preset_sets(runner):
    # A plain `harden patch` runs the robust preset, so --help shows its values as defaults (--adversary patched);
    # a custom recipe (--method ...) starts from the built-in defaults instead, and the help must say which differ.
    out = runner.invoke(main, ["patch", "--help"]).output
    text = " ".join(out.split())
    assert "--adversary [base|patched]" in text and "[default: patched]" in text
    robust = load_preset("robust")
    assert "robust (white-box, the default):" in text
    for key, flag in (("adversary", "--adversary"), ("attack_name", "--attack"), ("select_on", "--select-on")):
        assert f"{flag} {robust.options[key]}" in text
    assert "starts from the built-in defaults instead: " in text
    custom = text.split("starts from the built-in defaults instead: ")[1].split(". ")[0]
    assert "--adversary base" in custom and "--select-on 0" in custom and "None" not in custom
    assert "--at (the suggested sites, no pre-filter)" in custom  # the biggest difference: no pre-filter
    assert "--attack_name" not in text and "--loss_name" not in text


def test_auto_batch_size_keeps_small_data_from_underfitting():
    """`--batch-size auto` (preset robust's): 128 while that gives 400 optimiser steps, else 64, else 32."""
    from hardener.api import PatchOptions
    from hardener.training.steps import (
        auto_batch_size,
        settle_batch_size,
        training_setup,
    )

    assert auto_batch_size(6000, 10) == 128  # the 10% run: 470 steps of 128, as before
    assert auto_batch_size(3000, 10) == 64  # 240 steps of 128 -> 470 of 64
    assert auto_batch_size(1600, 10) == 32  # the demo: 130 steps of 128 -> 500 of 32
    assert auto_batch_size(50, 1) == 32  # never below 32
    opts, preset = PatchOptions.build("auto", {})
    assert preset.name == "robust" and opts.batch_size == "auto"
    _, cfg = training_setup(opts, 10)
    assert settle_batch_size(cfg, opts, 1600).batch_size == 32
    mine, _ = PatchOptions.build("auto", {"batch_size": 128})
    assert settle_batch_size(training_setup(mine, 10)[1], mine, 1600).batch_size == 128  # the user's number stays
    with pytest.raises(InputError, match="batch_size must be a positive integer or auto"):
        PatchOptions.build("auto", {"batch_size": "big"})


def test_patch_plan_names_the_auto_batch_and_the_manifest_records_it(runner, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--epochs", "1",
                             "--steps", "1", "--eval-samples", "10", "--eval-steps", "1", "--select-on", "10",
                             "--eps", "0.1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "steps of 32 (--batch-size auto)" in r.output
    assert hardener.load(out, arch=ARCH).manifest.training["config"]["batch_size"] == 32
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--batch-size",
                             "many", "--out", str(out), "--force"])
    assert r.exit_code == 2 and "must be a positive integer or auto" in r.output


@pytest.mark.parametrize("flag,verdict", [("--select-on", r"kept \(best so far\)|not kept \(epoch 1 stays"),
                                          ("--validate", r"logged \(no epoch selection\)")])
def test_a_validation_line_per_epoch(runner, tiny_ckpt, tiny_data, tmp_path, flag, verdict):
    import re

    fast = [a for a in FAST_PATCH if a != "--quiet"]
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), flag, "15",
                             "--out", str(tmp_path / "o.safetensors"), *fast])
    assert r.exit_code == 0, r.output
    lines = [s for s in r.output.splitlines() if " validation on 9 images: " in s]  # 9: half of the 18 held out
    assert [s.split()[1] for s in lines] == ["1/2", "2/2"], r.output
    for s in lines:
        assert re.search(r"clean \d+\.\d%, white-box PGD-10 \d+\.\d%, transfer \d+\.\d% \(\d+s\); ", s), s
    assert re.search(verdict, lines[1]) and (flag == "--validate" or "kept (best so far)" in lines[0]), lines
