"""Issue 31 item 2: what is patched (`--patch KIND[:SITE]`) and what trains (`--train METHOD`) are two options;
`--method`, which names both in one list, stays as an alias: a run spelled either way is the same run, the same
checkpoint."""
from __future__ import annotations

import pytest
import torch

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.options.patch_options import PatchOptions

from conftest import ARCH, FAST_PATCH


@pytest.mark.parametrize("split,joined", [
    ({"patch": "fixer:block,auxbn"}, {"method": "auxbn", "at": "fixer:block"}),
    ({"patch": "denoise", "train": "patch", "at": "block"}, {"method": "denoise", "at": "block"}),
    ({"train": "advamd"}, {"method": "advamd"}),
    ({"patch": "prefilter:input", "at": "block"}, {"method": "fixer", "at": "block,prefilter:input"}),
    ({"patch": "Fixer:Mixed_5b"}, {"method": "fixer", "at": "fixer:Mixed_5b"}),  # a kind in any case, the site as is
])
def test_patch_and_train_are_the_method_spelled_apart(split, joined):
    a, preset_a = PatchOptions.build("auto", split)
    b, preset_b = PatchOptions.build("auto", joined)
    assert preset_a is None and preset_b is None  # either spelling shapes the recipe: no preset
    assert (a.method, a.at, a.patch, a.train) == (b.method, b.at, None, None)
    assert a == b


def test_patch_and_train_refuse_the_other_spelling_and_each_others_names():
    with pytest.raises(InputError, match="give one spelling"):
        PatchOptions.build("auto", {"patch": "fixer", "method": "fixer"})
    with pytest.raises(InputError, match="^patch='advamd' is not a patch kind .* goes to train="):
        hardener.patch(torch.nn.Linear(2, 2), None, patch="advamd")  # the library's keywords
    with pytest.raises(InputError, match="^train='fixer' is not a training method"):
        hardener.patch(torch.nn.Linear(2, 2), None, train="fixer")
    with pytest.raises(InputError, match="^--train 'fixer' is not a training method .* goes to --patch"):
        PatchOptions.of({"train": "fixer"})  # the command line's flags


def test_the_cli_writes_the_same_checkpoint_for_either_spelling(runner, tiny_ckpt, tiny_data, tmp_path):
    base = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", *FAST_PATCH,
            "--epochs", "1"]
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    r = runner.invoke(main, [*base, "--method", "fixer", "--at", "block", "--out", str(old)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, [*base, "--patch", "fixer:block", "--train", "patch", "--out", str(new)])
    assert r.exit_code == 0, r.output
    assert new.read_bytes() == old.read_bytes()
    r = runner.invoke(main, [*base, "--method", "fixer", "--patch", "fixer", "--out", str(tmp_path / "x.st")])
    assert r.exit_code == 2 and "give one spelling" in r.output and "Traceback" not in r.output
