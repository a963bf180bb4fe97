"""Issue 35, item 1: one boundary for everything read -- Pillow's formats, tensors as stored, sizes before
allocating, OS errors as one line."""
from __future__ import annotations

import errno
import gzip
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hardener
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import InputError, RunError

from conftest import ARCH, assert_input_error, assert_run_error

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def image_folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eps_named_png_never_reaches_ghostscript(tmp_path, patched_ckpt):
    folder = image_folder(tmp_path / "imgs")
    (folder / "a" / "cover.png").write_bytes(EPS)
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "GS_RAN"
    (fake / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (fake / "gs").chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(Path(hardener.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-m", "hardener", "predict", str(patched_ckpt), "--arch", ARCH, "--data",
                        str(folder), "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "cover.png" in r.stderr and "PNG" in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_formats_harden_does_not_decode_are_refused_whatever_the_name(tmp_path, fmt):
    folder = image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b" / "odd.png", format=fmt)
    with pytest.raises(InputError, match="odd.png"):
        hdata.load(str(folder))


def test_real_formats_still_load(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    for fmt, ext in (("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp")):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b" / f"x.{ext}", format=fmt)
    assert len(hdata.load(str(folder))) == 8


# ---------------------------------------------------------------- tensors as stored


def _pt(tmp_path: Path, images, labels=None) -> Path:
    f = tmp_path / "d.pt"
    torch.save({"images": images, "labels": torch.arange(4) % 2 if labels is None else labels}, f)
    return f


@pytest.mark.parametrize("case,needle", [
    ("sparse", "sparse"), ("meta", "meta"), ("nan", "nan"), ("float_labels", "integers"),
    ("complex_labels", "integers"), ("complex_images", "dtype"),
])
def test_pt_tensors_must_be_dense_finite_cpu(runner, tmp_path, patched_ckpt, case, needle):
    x = torch.rand(4, 1, 8, 8)
    images, labels = {
        "sparse": (x.to_sparse(), None), "meta": (torch.empty(4, 1, 8, 8, device="meta"), None),
        "nan": (x.index_fill(0, torch.tensor([1]), float("nan")), None),
        "float_labels": (x, torch.tensor([0.0, 1.5, 0.0, 1.0])),
        "complex_labels": (x, torch.zeros(4, dtype=torch.complex64)),
        "complex_images": (x.to(torch.complex64), None),
    }[case]
    f = _pt(tmp_path, images, labels)
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(f), "--quiet"])
    assert_input_error(r, needle)


def test_pt_tensors_that_require_grad_are_detached(tmp_path):
    f = _pt(tmp_path, torch.rand(4, 1, 8, 8).requires_grad_(), torch.tensor([0, 1, 0, 1]))
    ds = hdata.load(str(f))
    assert not ds.images.requires_grad and ds.images.grad_fn is None


# ---------------------------------------------------------------- sizes before allocating


def _npy(shape, dtype="uint8", payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


def test_npz_header_that_lies_about_its_shape_is_refused_before_allocating(tmp_path):
    f = tmp_path / "lie.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("images.npy", _npy((10 ** 9, 3, 224, 224), payload=b"\0" * 64))
        z.writestr("labels.npy", _npy((4,), "int64", b"\0" * 32))
    with pytest.raises(InputError, match="declares shape"):
        hdata.load(str(f))


def test_npz_zip_bomb_is_refused_by_the_memory_budget(runner, tmp_path, patched_ckpt, monkeypatch):
    f = tmp_path / "bomb.npz"
    np.savez_compressed(f, images=np.zeros((4096, 1, 32, 32), np.uint8), labels=np.zeros(4096, np.int64))
    assert f.stat().st_size < 50_000  # 4 MiB of zeros: a small file that inflates
    monkeypatch.setattr(hdata, "memory_budget", lambda: 1 << 20)
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(f), "--quiet"])
    assert_input_error(r, "bomb.npz", "GiB")
    assert hdata.memory_budget.__name__ == "<lambda>"
    monkeypatch.undo()
    assert len(hdata.load(str(f))) == 4096  # within the real budget it loads


def _idx(dims, data: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + data


@pytest.mark.parametrize("case,needle", [
    ("lying_header", "declares"), ("truncated_header", "header"), ("bad_magic", "not an idx"),
    ("not_gzip", "not gzip"), ("truncated_gzip", "gzip"), ("gz_lying_header", "declares"),
])
def test_damaged_idx_files(tmp_path, monkeypatch, case, needle):
    root = tmp_path / "fmnist"
    root.mkdir()
    images = _idx([3, 28, 28], b"\0" * (3 * 784))
    labels = _idx([3], b"\0\1\2")
    name = "t10k-images-idx3-ubyte"
    if case == "lying_header":
        images = _idx([60000, 28, 28], b"\0" * 784)
    elif case == "truncated_header":
        images = images[:9]
    elif case == "bad_magic":
        images = b"\x08\x08\x08\x03" + images[4:]
    if case in ("not_gzip", "truncated_gzip", "gz_lying_header"):
        name += ".gz"
        images = {"not_gzip": images, "truncated_gzip": gzip.compress(images)[:40],
                  "gz_lying_header": gzip.compress(_idx([60000, 28, 28], b"\0" * 784))}[case]
    (root / name).write_bytes(images)
    (root / "t10k-labels-idx1-ubyte").write_bytes(labels)
    monkeypatch.setenv("HARDEN_FASHION_MNIST_DIR", str(root))
    with pytest.raises(InputError, match=f"(?i){needle}"):
        hdata.load("fashion-mnist:test")
    (root / name).unlink()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx([3, 28, 28], b"\0" * (3 * 784))))
    assert len(hdata.load("fashion-mnist:test")) == 3  # the well-formed pair loads


def test_resize_beyond_the_memory_budget_is_refused_before_allocating(tmp_path, monkeypatch):
    ds = hdata.Dataset(torch.zeros(1000, 3, 8, 8, dtype=torch.uint8), torch.zeros(1000, dtype=torch.int64))
    monkeypatch.setattr(hdata, "memory_budget", lambda: 1 << 24)
    with pytest.raises(InputError, match="resizing 1,000 images to 4096x4096"):
        hdata.conform(ds, None, (4096, 4096), None)


# ---------------------------------------------------------------- OS errors


def test_data_name_too_long_is_one_line(runner, tmp_path, patched_ckpt):
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(tmp_path / ("d" * 300)),
                             "--quiet"])
    assert_input_error(r, "too long")


def test_unreadable_class_folder_is_exit_2(runner, tmp_path, patched_ckpt, monkeypatch):
    folder = image_folder(tmp_path / "imgs")
    real = Path.iterdir

    def iterdir(self):
        if self.name == "b":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)  # (tests run as root, where chmod 000 would not stop reading)
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(folder), "--quiet"])
    assert_input_error(r, "permission denied", "imgs/b")


def test_out_of_memory_while_loading_is_exit_3(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    def no_memory(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(np, "load", no_memory)
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_run_error(r, "out of memory", "toy_test.npz")
    with pytest.raises(RunError):
        hdata.load(str(tiny_test_data))


def test_pt_tensor_whose_shape_is_past_the_budget_is_refused_before_it_is_materialised(tmp_path):
    """A stride-0 view saves one element of storage but declares 3e12: refused by its shape (exit 2), not by an
    allocation that fails (exit 3) or succeeds."""
    f = tmp_path / "d.pt"
    torch.save({"images": torch.zeros(1, 1, 1, 1).expand(10 ** 6, 3, 1000, 1000),
                "labels": torch.zeros(1, dtype=torch.long).expand(10 ** 6)}, f)
    assert f.stat().st_size < 10_000
    with pytest.raises(InputError, match="images of shape .* GiB in memory"):
        hdata.load(str(f))
