"""Bad input: exit 2 with one clear error line and no traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hardener.cli.app import main

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def _patch(runner, model, *args, data=None):
    argv = ["patch", str(model), *FAST_PATCH, *args]
    if data is not None:
        argv += ["--data", str(data)]
    return runner.invoke(main, argv)


def test_nonexistent_checkpoint(runner, tmp_path, tiny_data):
    r = _patch(runner, tmp_path / "nope.safetensors", "--arch", ARCH, data=tiny_data)
    assert_input_error(r, "does not exist")


def test_html_page_saved_as_pt(runner, tmp_path, tiny_data):
    f = tmp_path / "model.pt"
    f.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    r = _patch(runner, f, "--arch", ARCH, data=tiny_data)
    assert_input_error(r, "not a", "checkpoint")


def test_state_dict_without_arch(runner, tmp_path, tiny_data):
    f = tmp_path / "model.pt"
    torch.save(trained_tiny(steps=1).state_dict(), f)
    r = _patch(runner, f, data=tiny_data)
    assert_input_error(r, "--arch")


def test_arch_keys_dont_match(runner, tmp_path, tiny_data):
    f = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(4, 1, 3, 3), "fc.bias": torch.zeros(3)}, str(f))
    r = _patch(runner, f, "--arch", ARCH, data=tiny_data)
    assert_input_error(r, "does not match", "missing")


def test_arch_shapes_dont_match(runner, tiny_ckpt, tiny_data):
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, "--arch-kwargs", '{"width": 8}', data=tiny_data)
    assert_input_error(r, "shape")


def test_site_that_does_not_exist(runner, tiny_ckpt, tiny_data):
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, "--at", "layer9", data=tiny_data)
    assert_input_error(r, "layer9", "closest")


def test_image_folder_with_single_class(runner, tmp_path, tiny_ckpt):
    d = tmp_path / "imgs" / "only"
    d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, data=tmp_path / "imgs")
    assert_input_error(r, "class")


def test_images_of_wrong_size(runner, tmp_path, tiny_ckpt, patched_ckpt):
    imgs, labels = make_data(n=30, size=12)
    f = tmp_path / "big.npz"
    np.savez(f, images=imgs.numpy(), labels=labels.numpy())
    # a patched checkpoint records its input shape: wrong-size images are named as such
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(f), "--quiet"])
    assert_input_error(r, "(1, 12, 12)", "--resize")


def test_images_of_wrong_size_for_fixed_size_model(runner, tmp_path):
    # a model with a flatten+linear head fails on the wrong size: the error names the shape
    import tiny_model
    from conftest import HERE

    f = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.fragile().state_dict().items()}, str(f))
    imgs, labels = make_data(n=20, size=6, classes=2)
    d = tmp_path / "d.npz"
    np.savez(d, images=imgs.numpy(), labels=labels.numpy())
    r = _patch(runner, f, "--arch", f"{HERE / 'tiny_model.py'}:fragile", data=d)
    assert_input_error(r, "shape (1, 6, 6)")


def test_labels_out_of_range(runner, tmp_path, tiny_ckpt):
    imgs, labels = make_data(n=30)
    labels[0] = 7
    f = tmp_path / "bad.npz"
    np.savez(f, images=imgs.numpy(), labels=labels.numpy())
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, data=f)
    assert_input_error(r, "labels", "0..7", "3 outputs")


def test_pickled_module_needs_trust(runner, tmp_path, tiny_data):
    f = tmp_path / "whole.pt"
    torch.save(trained_tiny(steps=1), f)
    r = _patch(runner, f, data=tiny_data)
    assert_input_error(r, "--trust-pickle")


def test_patching_a_patched_checkpoint_is_refused(runner, patched_ckpt, tiny_data):
    r = _patch(runner, patched_ckpt, "--arch", ARCH, data=tiny_data)
    assert_input_error(r, "already")


def test_existing_output_needs_force(runner, tmp_path, tiny_ckpt, tiny_data):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, "--out", str(out), data=tiny_data)
    assert_input_error(r, "--force")
    assert out.read_bytes() == b"keep me"


def test_final_relu_on_negative_site(runner, tiny_ckpt, tiny_data):
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, "--at", "block", "--final-relu", data=tiny_data)
    assert_input_error(r, "non-negative")


def test_shared_module_is_not_a_site(runner, tmp_path, tiny_data):
    import tiny_model
    from conftest import HERE

    f = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.shared().state_dict().items()}, str(f))
    r = _patch(runner, f, "--arch", f"{HERE / 'tiny_model.py'}:shared", "--at", "relu", data=tiny_data)
    assert_input_error(r, "relu", "called 2x")


@pytest.mark.parametrize("args,needle", [
    (["--subset", "150%"], "--subset"),
    (["--eps", "eight"], "eps"),
    (["--attack", "nope"], "unknown attack"),
    (["--at", "magic:features"], "unknown patch kind"),
    (["--at-regex", "zzz.*"], "--at-regex"),
])
def test_bad_options(runner, tiny_ckpt, tiny_data, args, needle):
    r = _patch(runner, tiny_ckpt, "--arch", ARCH, *args, data=tiny_data)
    assert_input_error(r, needle)


def test_missing_data_is_usage_error(runner, tiny_ckpt):
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH])
    assert r.exit_code == 2 and "--data" in r.output


def test_pickled_module_patches_then_evaluates_and_exports_with_its_file_as_arch(runner, tmp_path, tiny_data):
    """A base saved as a whole pickled module records no constructor: `--arch THAT_FILE --trust-pickle` rebuilds
    it for eval, export and predict (the file's weights replaced by the patched checkpoint's)."""
    f = tmp_path / "whole.pt"
    torch.save(trained_tiny(steps=5), f)  # 5 steps: it answers one class (33% on 3), hence --allow-low-accuracy
    out = tmp_path / "whole.hardened.safetensors"
    r = runner.invoke(main, ["patch", str(f), "--trust-pickle", "--data", str(tiny_data), "--subset", "0.5",
                             "--at", "block", "--out", str(out), "--allow-low-accuracy", *FAST_PATCH])
    assert r.exit_code == 0, r.output
    ev = ["eval", str(out), "--data", str(tiny_data), "--attack", "apgd-ce", "--steps", "2", "--eps", "0.05",
          "--quiet", "--json", "--allow-low-accuracy"]
    r = runner.invoke(main, ev)
    assert_input_error(r, "--trust-pickle")  # no architecture recorded: the message names the way through
    r = runner.invoke(main, [*ev, "--arch", str(f)])
    assert_input_error(r, "--trust-pickle")  # the file runs code when loaded
    r = runner.invoke(main, [*ev, "--arch", str(f), "--trust-pickle"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(out), "--arch", str(f), "--trust-pickle", "--format", "export",
                             "--out", str(tmp_path / "e.pt2")])
    assert r.exit_code == 0, r.output
    torch.save(trained_tiny(steps=5).state_dict(), tmp_path / "sd.pt")
    r = runner.invoke(main, [*ev, "--arch", str(tmp_path / "sd.pt"), "--trust-pickle"])
    assert_input_error(r, "not a pickled nn.Module")


# --- no silent wrong number: eps in 0-255 units, a model fed inputs it was not trained on, channels -------------------

def test_eps_in_255_units_suggests_the_fraction(runner, tiny_ckpt, tiny_data):
    assert_input_error(_patch(runner, tiny_ckpt, "--arch", ARCH, "--eps", "8", data=tiny_data), "--eps 8", "8/255")
    ev = ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--attack", "fgsm"]
    assert_input_error(runner.invoke(main, [*ev, "--eps", "8"]), "Linf", "did you mean 8/255")
    assert_input_error(runner.invoke(main, [*ev, "--eps", "0"]), "positive")
    assert_input_error(runner.invoke(main, [*ev, "--eps", "0.1", "--eps-sweep", "0,4"]), "--eps-sweep 4", "4/255")
    # L2: over sqrt(C*H*W) = 8 for 1x8x8 images, known once the data is loaded
    assert_input_error(runner.invoke(main, [*ev, "--norm", "L2", "--eps", "9"]), "L2", "9/255")


def test_eps_fraction_in_config_and_library(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch):
    import hardener
    from hardener.errors import InputError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "harden.toml").write_text('eps = "300/255"\n')
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--attack", "fgsm"])
    assert_input_error(r, "1.176", "Linf")  # the fraction was read (300/255 > 1), then refused
    x, y = make_data(n=60)
    with pytest.raises(InputError, match="did you mean 8/255"):
        hardener.evaluate(trained_tiny(), (x.float() / 255, y), attacks="fgsm", eps=8, checks=False)


def _normalised_tiny(tmp_path, mean=0.3, std=0.05):
    """A tiny model trained on (x - mean) / std: fed raw [0, 1] pixels, it answers one class for every image."""
    import tiny_model

    torch.manual_seed(0)
    m = tiny_model.tiny()
    imgs, labels = make_data(n=150, seed=1)
    x = (imgs.float() / 255 - mean) / std
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(m(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f = tmp_path / "normalised.safetensors"
    save_file({k: v.contiguous() for k, v in m.eval().state_dict().items()}, str(f))
    return f, m


def test_missing_normalisation_stops_with_the_mean_std_line(runner, tmp_path, tiny_data):
    import hardener
    from hardener.errors import InputError

    f, m = _normalised_tiny(tmp_path)
    r = _patch(runner, f, "--arch", ARCH, data=tiny_data)
    assert_input_error(r, "about chance", "--mean/--std", "--input-shape", "--classes", "--allow-low-accuracy")
    ev = ["eval", str(f), "--arch", ARCH, "--data", str(tiny_data), "--attack", "fgsm", "--eps", "0.1",
          "--no-checks", "--json"]
    assert_input_error(runner.invoke(main, ev), "33.3%", "--mean/--std")
    ok = runner.invoke(main, [*ev, "--mean", "0.3", "--std", "0.05"])  # the right normalisation: no stop
    assert ok.exit_code == 0, ok.output
    allowed = runner.invoke(main, [*ev, "--allow-low-accuracy"])  # goes on; the report says why to doubt it
    assert allowed.exit_code == 0, allowed.output
    assert any("about chance" in n for n in json.loads(allowed.stdout)["data"]["warnings"])
    x, y = make_data(n=90)
    with pytest.raises(InputError, match="mean=/std="):
        hardener.evaluate(m, (x.float() / 255, y), attacks="fgsm", eps=0.1, checks=False)
    rep = hardener.evaluate(m, (x.float() / 255, y), attacks="fgsm", eps=0.1, checks=False, mean=[0.3], std=[0.05])
    assert rep.clean > 0.9


def test_rgb_data_into_a_grayscale_model_is_converted(runner, tmp_path, tiny_ckpt):
    imgs, labels = make_data(n=90, channels=3)
    f = tmp_path / "rgb.npz"
    np.savez(f, images=imgs.numpy(), labels=labels.numpy())
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(f), "--attack", "fgsm",
                             "--eps", "0.1", "--no-checks", "--json"])
    assert r.exit_code == 0, r.output
    assert "RGB -> grayscale" in r.output and json.loads(r.stdout)["summary"]["clean"] > 0.9


def test_channel_mismatch_is_one_line_with_the_expected_shape(runner, tmp_path):
    import tiny_model

    f = tmp_path / "two.safetensors"  # a 2-channel stem: no conversion reaches it
    save_file({k: v.contiguous() for k, v in tiny_model.tiny(in_channels=2).state_dict().items()}, str(f))
    imgs, labels = make_data(n=60, channels=3)
    d = tmp_path / "rgb.npz"
    np.savez(d, images=imgs.numpy(), labels=labels.numpy())
    r = runner.invoke(main, ["eval", str(f), "--arch", ARCH, "--arch-kwargs", '{"in_channels": 2}', "--data", str(d)])
    assert_input_error(r, "3 channels", "takes 2", "(2, H, W)")
