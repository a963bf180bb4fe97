"""Malformed input: one clear line, exit 2, nothing written; failed writes leave nothing behind."""
from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.patches import parse_sites
from hardener.reports import report as R

from conftest import ARCH, FAST_PATCH, assert_input_error, make_data, trained_tiny


def _patch(runner, model, data, tmp_path, *extra):
    out = tmp_path / "out.safetensors"
    r = runner.invoke(main, ["patch", str(model), "--arch", ARCH, "--data", str(data), "--out", str(out),
                             *FAST_PATCH, *extra])
    return r, out


def _npz(tmp_path, images, labels, name="d.npz"):
    f = tmp_path / name
    np.savez(f, images=images, labels=labels)
    return f


def test_truncated_safetensors(runner, tmp_path, tiny_ckpt, tiny_data):
    f = tmp_path / "cut.safetensors"
    f.write_bytes(tiny_ckpt.read_bytes()[:-100])
    r, out = _patch(runner, f, tiny_data, tmp_path)
    assert_input_error(r, "safetensors")
    assert not out.exists()


def test_corrupted_safetensors_header(runner, tmp_path, tiny_data):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\xff" * 64)
    r, out = _patch(runner, f, tiny_data, tmp_path)
    assert_input_error(r, "safetensors")


def test_checkpoint_with_integer_weights(runner, tmp_path, tiny_data):
    sd = {k: (v * 100).to(torch.int32) if v.is_floating_point() else v
          for k, v in trained_tiny(steps=1).state_dict().items()}
    f = tmp_path / "int.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    r, _ = _patch(runner, f, tiny_data, tmp_path)
    assert_input_error(r, "dtype")


@pytest.mark.parametrize("case,needle", [
    ("nan", "nan or inf"), ("int32", "dtype"), ("float_range", "[0, 1]"), ("count", "labels"),
    ("float_labels", "integers"),
])
def test_malformed_tensor_data(runner, tmp_path, tiny_ckpt, case, needle):
    imgs, labels = make_data(n=30)
    images, lab = imgs.numpy(), labels.numpy()
    if case == "nan":
        images = images.astype(np.float32) / 255
        images[0, 0, 0, 0] = np.nan
    elif case == "int32":
        images = images.astype(np.int32)
    elif case == "float_range":
        images = images.astype(np.float32)
    elif case == "count":
        lab = lab[:-1]
    elif case == "float_labels":
        lab = lab.astype(np.float32)
    r, out = _patch(runner, tiny_ckpt, _npz(tmp_path, images, lab), tmp_path)
    assert_input_error(r, needle)
    assert not out.exists()


def test_empty_folder_and_class_without_images(runner, tmp_path, tiny_ckpt):
    (tmp_path / "empty").mkdir()
    r, _ = _patch(runner, tiny_ckpt, tmp_path / "empty", tmp_path)
    assert_input_error(r, "0 class")
    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "f" / "a" / "x.png")
    r, _ = _patch(runner, tiny_ckpt, tmp_path / "f", tmp_path)
    assert_input_error(r, "no images")


def test_unreadable_image_file(runner, tmp_path, tiny_ckpt):
    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "f" / name / "ok.png")
    (tmp_path / "f" / "b" / "broken.png").write_bytes(b"not a png")
    r, _ = _patch(runner, tiny_ckpt, tmp_path / "f", tmp_path)
    assert_input_error(r, "cannot read image")


def test_mixed_sizes_need_resize_and_mixed_modes_convert(tmp_path):
    for name, size, mode in (("a", 8, "L"), ("b", 10, "RGB")):
        (tmp_path / name).mkdir()
        arr = np.zeros((size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / name / "x.png")
    with pytest.raises(InputError, match="--resize"):
        hdata.load(str(tmp_path))
    ds = hdata.load(str(tmp_path), resize=(8, 8))
    assert ds.shape == (3, 8, 8)
    assert any("grayscale images converted" in n for n in ds.notes) and any("resized" in n for n in ds.notes)


def test_manifest_checksum_catches_tampered_base(runner, tmp_path, patched_ckpt, tiny_test_data):
    from safetensors import safe_open

    with safe_open(str(patched_ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(patched_ckpt))
    key = next(k for k in tensors if k.endswith("running_mean"))
    tensors[key] = tensors[key] + 1
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = runner.invoke(main, ["eval", str(bad), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "checksum")


def test_newer_format_version_is_refused(runner, tmp_path, patched_ckpt, tiny_test_data):
    from safetensors import safe_open

    with safe_open(str(patched_ckpt), framework="pt") as f:
        meta = f.metadata()
    manifest = json.loads(meta["harden"])
    manifest["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(str(patched_ckpt)), str(newer), metadata={"harden": json.dumps(manifest)})
    r = runner.invoke(main, ["eval", str(newer), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "newer")


def test_failed_write_leaves_no_output_and_exits_3(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch):
    import safetensors.torch

    before = tiny_ckpt.read_bytes()

    def full_disk(tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save", full_disk)
    r, out = _patch(runner, tiny_ckpt, tiny_data, tmp_path, "--subset", "30")
    assert r.exit_code == 3 and "No space left" in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))
    assert tiny_ckpt.read_bytes() == before


def test_nan_loss_exits_3_and_keeps_last_state(runner, tmp_path, tiny_ckpt, tiny_data):
    r, out = _patch(runner, tiny_ckpt, tiny_data, tmp_path, "--subset", "30", "--lr", "1e30", "--epochs", "3")
    assert r.exit_code == 3 and "loss became" in r.output
    assert not out.exists()


# ---------------------------------------------------------------- property-based parsers


@given(st.integers(0, 10_000), st.integers(1, 10_000))
def test_eps_fractions_parse(num, den):
    assert A.parse_eps(f"{num}/{den}") == pytest.approx(num / den)


@given(st.text(max_size=12))
@example("NAN")
@example("inf")
@example("-0.1")
def test_eps_parser_never_crashes(text):
    try:
        v = A.parse_eps(text)
    except InputError:
        return
    assert v >= 0 and math.isfinite(v)


@given(st.one_of(st.text(max_size=10), st.floats(allow_nan=True), st.integers(-5, 10**7)))
def test_subset_parser_never_crashes(value):
    try:
        v = hdata.parse_subset(value)
    except InputError:
        return
    assert v is None or (isinstance(v, float) and 0 < v <= 1) or (isinstance(v, int) and v >= 1)


@given(st.lists(st.sampled_from(["a", "b", "a.b", "c", "zz", "fixer:a", "bogus:b", " "]), max_size=5))
def test_site_parser_accepts_known_names_only(entries):
    names = ["", "a", "b", "a.b", "c"]
    try:
        sites = parse_sites(",".join(entries), None, names)
    except InputError:
        return
    assert all(kind == "fixer" and site in names for kind, site in sites)
    assert len({s for _, s in sites}) == len(sites)


@given(st.dictionaries(st.sampled_from(["clean", "robust", "transfer", "blackbox", "speed"]),
                       st.one_of(st.floats(-1, 2), st.text(max_size=4)), max_size=4))
def test_fail_under_parser(spec):
    text = ",".join(f"{k}={v}" for k, v in spec.items())
    try:
        out = R.parse_fail_under(text)
    except InputError:
        return
    assert set(out) <= {"clean", "robust", "transfer", "blackbox"} and all(0 <= v <= 1 for v in out.values())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.sampled_from(["uint8", "float32", "float64"]),
       st.booleans(), st.sampled_from([1, 3]))
def test_tensor_file_loading(n, size, dtype, nhwc, channels):
    import tempfile
    from pathlib import Path

    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, channels, size + 3, size + 3)).astype(dtype)
    if dtype != "uint8":
        images = images / 255
    if nhwc:
        images = images.transpose(0, 2, 3, 1)
    labels = np.arange(n) % 2
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.npz"
        np.savez(f, images=images, labels=labels)
        ds = hdata.load(str(f))
    assert ds.shape == (channels, size + 3, size + 3) and len(ds) == n
    x = hdata.to_float(ds.images)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
