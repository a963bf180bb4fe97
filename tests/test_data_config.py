"""Data loading, subsets, preprocessing, config files, checkpoint variants, the real entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hardener import data as hdata
from hardener.cli.app import main

from conftest import ARCH, HERE, make_data, trained_tiny

ROOT = HERE.parent


def test_stratified_subset_is_seeded_and_proportional():
    labels = torch.arange(1000) % 10
    a, rest = hdata.stratified_split(labels, 0.1, seed=3)
    b, _ = hdata.stratified_split(labels, 0.1, seed=3)
    c, _ = hdata.stratified_split(labels, 0.1, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 100 and len(rest) == 900
    assert torch.bincount(labels[a]).tolist() == [10] * 10
    assert hdata.parse_subset("10%") == 0.1 and hdata.parse_subset("600") == 600


def test_image_folder_with_resize_and_rgb(tmp_path):
    for c, name in enumerate(["cat", "dog"]):
        d = tmp_path / name
        d.mkdir()
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 60 * c + i, dtype=np.uint8)).save(d / f"{i}.png")
    ds = hdata.load(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.shape == (3, 16, 16)
    ds2 = hdata.conform(ds, channels=1, resize=(8, 8), crop=None)
    assert ds2.shape == (1, 8, 8)
    assert any("grayscale" in n for n in ds2.notes) and any("resized" in n for n in ds2.notes)


def test_class_map_file(tmp_path):
    for name in ["b", "a"]:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "imgs" / name / "x.png")
    (tmp_path / "classes.txt").write_text("b\na\n")
    ds = hdata.apply_class_map(hdata.load(str(tmp_path / "imgs")), str(tmp_path / "classes.txt"))
    # sorted folders are a, b; the file says b is 0
    assert ds.labels.tolist() == [1, 0] and ds.classes == ["b", "a"]


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
def test_tensor_files_nhwc_float(tmp_path, fmt):
    imgs, labels = make_data(n=12)
    x = (imgs.float() / 255).permute(0, 2, 3, 1).contiguous()  # NHWC float
    f = tmp_path / f"d.{fmt}"
    if fmt == "npz":
        np.savez(f, images=x.numpy(), labels=labels.numpy())
    elif fmt == "pt":
        torch.save({"images": x, "labels": labels}, f)
    else:
        save_file({"images": x, "labels": labels}, str(f))
    ds = hdata.load(str(f))
    assert ds.shape == (1, 8, 8) and len(ds) == 12


def test_fashion_mnist_idx_reader():
    if not Path(hdata.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    ds = hdata.load("fashion-mnist:test")
    assert len(ds) == 10000 and ds.shape == (1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


def test_config_file_supplies_options(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch):
    (tmp_path / "harden.toml").write_text(f'arch = "{ARCH}"\n[patch]\nat = ["block"]\nsubset = "0.5"\n'
                                          f'eps = "0.1"\n')
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--data", str(tiny_data), "--out", str(out),
                             "--epochs", "1", "--steps", "2", "--eval-samples", "10", "--eval-steps", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    from hardener.io.checkpoint import read_manifest
    m = read_manifest(out)
    assert [p["site"] for p in m.patches] == ["block"] and m.training["attack"]["eps"] == 0.1
    # the command line wins over the file
    out2 = tmp_path / "o2.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--data", str(tiny_data), "--out", str(out2), "--at", "features",
                             "--epochs", "1", "--steps", "2", "--eval-samples", "10", "--eval-steps", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert [p["site"] for p in read_manifest(out2).patches] == ["features"]


def test_config_unknown_key_is_an_error(runner, tmp_path, tiny_ckpt, monkeypatch):
    (tmp_path / "harden.toml").write_text('[patch]\nepoch = 3\n')
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["patch", str(tiny_ckpt)])
    assert r.exit_code == 2 and "unknown key 'epoch'" in r.output


def test_checkpoint_variants_load(tmp_path, tiny_data, runner):
    """fp16 weights, DataParallel/compile prefixes, a tuple output picked with --logits, a trusted pickle."""
    m = trained_tiny()
    sd = {f"module._orig_mod.{k}": v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "half.pt")
    r = runner.invoke(main, ["layers", str(tmp_path / "half.pt"), "--arch", ARCH, "--input-shape", "1,8,8", "--json"])
    assert r.exit_code == 0, r.output
    assert "features" in json.loads(r.stdout)["suggested_sites"] + [i["name"] for i in json.loads(r.stdout)["layers"]]
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "t.safetensors"))
    variants = ((f"{HERE / 'tiny_model.py'}:tiny_tuple", "0"), (f"{HERE / 'tiny_model.py'}:tiny_dict", "scores"))
    for arch, logits in variants:
        r = runner.invoke(main, ["eval", str(tmp_path / "t.safetensors"), "--arch", arch, "--logits", logits,
                                 "--data", str(tiny_data), "--attack", "fgsm", "--eps", "0.05", "--quiet",
                                 "--no-checks", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["models"]["base"]["clean"]["accuracy"] > 0.5
    torch.save(m, tmp_path / "whole.pt")
    r = runner.invoke(main, ["layers", str(tmp_path / "whole.pt"), "--trust-pickle", "--input-shape", "1,8,8"])
    assert r.exit_code == 0, r.output


def test_layers_marks_shared_module(runner, tmp_path):
    import tiny_model
    f = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.shared().state_dict().items()}, str(f))
    r = runner.invoke(main, ["layers", str(f), "--arch", f"{HERE / 'tiny_model.py'}:shared", "--input-shape",
                             "1,8,8", "--json"])
    rows = {i["name"]: i for i in json.loads(r.stdout)["layers"]}
    assert rows["relu"]["site"] is False and rows["relu"]["calls"] == 2
    assert rows["conv1"]["site"] is True


def test_python_dash_m_entry_point_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "hardener", "patch", str(tmp_path / "none.pt"), "--data", "x"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("Error:")


def test_example_on_fashion_mnist(runner, tmp_path):
    """The shipped example base on real data: patch a little, the report says what it measured."""
    if not Path(hdata.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    out, rep = tmp_path / "f.safetensors", tmp_path / "r.json"
    r = runner.invoke(main, ["patch", str(ROOT / "examples/fmnist_base.safetensors"), "--arch",
                             f"{ROOT / 'examples/fmnist_model.py'}:resnet9_small", "--mean", "0.2860", "--std",
                             "0.3530", "--data", "fashion-mnist:train", "--subset", "300", "--eval-data",
                             "fashion-mnist:test", "--eval-samples", "100", "--eval-steps", "5", "--epochs", "1",
                             "--steps", "3", "--eps", "0.1", "--select-on", "50", "--out", str(out), "--report", str(rep),
                             "--quiet"])  # --select-on 50: the recipe's per-epoch validation on 500 took most of a minute
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["models"]["base"]["clean"]["accuracy"] > 0.8  # the shipped base is a real classifier
    assert report["data"]["n"] == 100 and report["training"]["data"]["n"] == 300
    assert set(report["models"]["patched"]["threats"]) == {"whitebox", "transfer"}


def test_augment_keeps_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    y = hdata.augment(x, g)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.equal(x, y)
