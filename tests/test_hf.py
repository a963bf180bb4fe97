"""Hugging Face-style classifiers: an object output with `.logits`, normalisation from preprocessor_config.json."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hardener
from hardener.cli import main
from hardener.errors import InputError

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


class HFLike(nn.Module):
    """Returns an output object with `.logits`, as transformers' image classifiers do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = trained_tiny()

    def forward(self, pixel_values: torch.Tensor):
        return SimpleNamespace(logits=self.net(pixel_values), hidden_states=None)


def _config(tmp_path, **kw) -> str:
    cfg = {"do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.5],
           "image_std": [0.25], "size": {"height": 8, "width": 8}, **kw}
    p = tmp_path / "preprocessor_config.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_preprocessor_config_gives_the_normalisation(tmp_path):
    m = hardener.as_patched(HFLike(), preprocessor=_config(tmp_path))
    assert m.model.spec.mean == [0.5] and m.model.spec.std == [0.25]
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x), HFLike.__call__(m.model.net, (x - 0.5) / 0.25).logits)
    plain = hardener.as_patched(HFLike(), preprocessor=_config(tmp_path, do_normalize=False))
    assert plain.model.spec.mean is None
    with pytest.raises(InputError, match="1/255"):
        hardener.as_patched(HFLike(), preprocessor=_config(tmp_path, do_rescale=False))
    with pytest.raises(InputError, match="image_std"):
        hardener.as_patched(HFLike(), preprocessor=_config(tmp_path, image_std="wide"))
    with pytest.raises(InputError, match="one or the other"):
        hardener.as_patched(HFLike(), mean=0.5, preprocessor=_config(tmp_path))


def test_cli_preprocessor_recorded_in_the_patched_checkpoint(runner, tmp_path, tiny_ckpt, tiny_data):
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--preprocessor", _config(tmp_path),
                             "--data", str(tiny_data), "--subset", "0.5", "--at", "block", "--out", str(out),
                             *FAST_PATCH])
    assert r.exit_code == 0, r.output
    again = hardener.load(out, arch=ARCH)
    assert again.model.spec.mean == [0.5] and again.model.spec.std == [0.25]
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--preprocessor", str(tmp_path / "bad.json"),
                             "--data", str(tiny_data), "--out", str(tmp_path / "q"), *FAST_PATCH])
    assert_input_error(r, "JSON object")
    imgs, _ = make_data(n=4)
    assert imgs.shape[1:] == (1, 8, 8)
