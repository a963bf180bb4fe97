"""Hugging Face-style classifiers: an object output with `.logits`, normalisation from preprocessor_config.json."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hardener
from hardener.cli.app import main
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


def test_a_save_pretrained_folder_patches_evaluates_and_exports_as_saved(runner, tmp_path, tiny_data, tiny_test_data):
    """transformers' own `from_pretrained` loads the folder (its key renames, its config); the manifest records the
    class and config, no code; eval and export rebuild it without --arch."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from hardener.io.checkpoint import read_manifest

    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    folder = tmp_path / "vit"
    hf.save_pretrained(folder)
    pre = _config(tmp_path)
    data = str(tiny_test_data)
    r = runner.invoke(main, ["layers", str(folder / "model.safetensors"), "--input-shape", "1,8,8", "--json"])
    assert r.exit_code == 0, r.output  # the weights file beside its config.json is the same model
    out = tmp_path / "vit.hardened.safetensors"
    r = runner.invoke(main, ["patch", str(folder), "--preprocessor", pre, "--data", str(tiny_data), "--out", str(out),
                             "--at", "auto", "--epochs", "1", "--steps", "1", "--eps", "0.1", "--eval-samples", "6",
                             "--eval-steps", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert manifest.arch == "hf:ViTForImageClassification" and manifest.arch_kwargs["config"]["hidden_size"] == 16
    stored = load_file(str(out))
    assert all(torch.equal(stored[k], v) for k, v in hf.state_dict().items())  # transformers' own names and values
    again = hardener.load(out).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad(), again.patches_disabled():
        assert torch.equal(again(x), hf((x - 0.5) / 0.25).logits)
    r = runner.invoke(main, ["eval", str(out), "--data", data, "--eps", "0.1", "--steps", "1", "--max-samples", "6",
                             "--no-checks", "--quiet", "--threat", "whitebox"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "vit.ts.pt")])
    assert r.exit_code == 0, r.output
    assert "largest logit difference 0" in r.output
    # a manifest names transformers' image classifiers only, and its config cannot ask for more than the file holds
    from hardener.model import hf as H

    for name in ("os", "AutoModel", "PreTrainedModel", "ViTModel", "__class__"):
        with pytest.raises(InputError, match="not an image classifier"):
            H.build(f"hf:{name}", {"config": {}})
    huge = {**manifest.arch_kwargs["config"], "hidden_size": 4096, "intermediate_size": 1 << 16}
    with pytest.raises(InputError, match="asks for"):
        H.build(manifest.arch, {"config": huge}, budget=sum(v.numel() for v in stored.values()))
