"""Issue 20: hostile data, option values, outputs and faults: exit 2 or 3 with one line, inputs untouched."""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hardener
from hardener.cli.app import main

from conftest import ARCH, FAST_PATCH, assert_input_error, assert_run_error


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _predict(runner, model, data, *extra):
    return runner.invoke(main, ["predict", str(model), "--arch", ARCH, "--data", str(data), "--quiet", *extra])


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("case,needle", [
    ("empty_npz", "empty"), ("random_npz", "not a zip"), ("string_labels", "labels must be numbers"),
    ("npy_as_npz", ".npy"), ("no_images", "no images"), ("object_images", "cannot read"),
    ("bool_images", "dtype"), ("random_pt", "cannot read"), ("random_safetensors", "safetensors"),
])
def test_hostile_data_file(runner, tmp_path, patched_ckpt, case, needle):
    f = tmp_path / ("d.pt" if case == "random_pt" else "d.safetensors" if case == "random_safetensors" else "d.npz")
    if case == "empty_npz":
        f.write_bytes(b"")
    elif case in ("random_npz", "random_pt", "random_safetensors"):
        f.write_bytes(np.random.default_rng(0).bytes(300))
    elif case == "string_labels":
        np.savez(f, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.array(["a", "b", "a", "b"]))
    elif case == "npy_as_npz":
        with open(f, "wb") as fh:
            np.save(fh, np.zeros((4, 1, 8, 8), np.uint8))
    elif case == "no_images":
        np.savez(f, images=np.zeros((0, 1, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    elif case == "object_images":
        np.savez(f, images=np.array([object(), 1], dtype=object), labels=np.zeros(2, np.int64))
    elif case == "bool_images":
        np.savez(f, images=np.zeros((4, 1, 8, 8), bool), labels=np.zeros(4, np.int64))
    before = f.read_bytes()
    r = _predict(runner, patched_ckpt, f)
    assert_input_error(r, needle)
    assert f.read_bytes() == before


def test_decompression_bomb_png(runner, tmp_path, patched_ckpt):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "ok.png")
    (tmp_path / "imgs" / "a" / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 megapixels
    r = _predict(runner, patched_ckpt, tmp_path / "imgs")
    assert_input_error(r, "bomb.png")


def test_fifo_as_data_or_classes_does_not_hang(runner, tmp_path, patched_ckpt, tiny_test_data):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    assert_input_error(_predict(runner, patched_ckpt, fifo), "not a regular file")
    assert_input_error(_predict(runner, patched_ckpt, tiny_test_data, "--classes", str(fifo)), "regular file")
    assert_input_error(runner.invoke(main, ["predict", str(fifo), "--data", str(tiny_test_data)]), "regular file")


@pytest.mark.parametrize("content,needle", [(b'["a", "b"', "invalid json"), (b"\xff\xfe\x00bad", "utf-8"),
                                            (b'{"a": "x"}', "indices"), (b"[]", "no classes")])
def test_bad_classes_file(runner, tmp_path, patched_ckpt, content, needle):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / c / "x.png")
    f = tmp_path / "classes.json"
    f.write_bytes(content)
    r = _predict(runner, patched_ckpt, tmp_path / "imgs", "--classes", str(f))
    assert_input_error(r, needle)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("cmd,args,flag", [
    ("patch", ["--lr", "nan"], "--lr"), ("patch", ["--lr", "-1"], "--lr"), ("patch", ["--steps", "-1"], "--steps"),
    ("patch", ["--epochs", "0"], "--epochs"), ("patch", ["--batch-size", "0"], "--batch-size"),
    ("patch", ["--rho", "inf"], "--rho"), ("patch", ["--eval-samples", "-3"], "--eval-samples"),
    ("eval", ["--batch-size", "0"], "--batch-size"), ("eval", ["--batch-size", "-1"], "--batch-size"),
    ("eval", ["--restarts", "0"], "--restarts"), ("eval", ["--steps", "-5"], "--steps"),
    ("eval", ["--max-samples", "-1"], "--max-samples"), ("eval", ["--queries", "0"], "--queries"),
    ("predict", ["--max-samples", "-1"], "--max-samples"), ("predict", ["--max-samples", "0"], "--max-samples"),
    ("predict", ["--resize", "0,0"], "--resize"), ("eval", ["--resize", "0,8"], "--resize"),
    ("predict", ["--crop", "0,3"], "--crop"), ("predict", ["--post-lr", "nan"], "--post-lr"),
])
def test_bad_option_values(runner, tiny_ckpt, patched_ckpt, tiny_data, cmd, args, flag):
    model = tiny_ckpt if cmd == "patch" else patched_ckpt
    extra = FAST_PATCH if cmd == "patch" else ["--quiet"]
    r = runner.invoke(main, [cmd, str(model), "--arch", ARCH, "--data", str(tiny_data), *extra, *args])
    assert_input_error(r, flag)


# ---------------------------------------------------------------- outputs never overwrite inputs


def test_patch_out_is_the_data_file(runner, tmp_path, tiny_ckpt, tiny_data):
    data = tmp_path / "train.npz"
    data.write_bytes(tiny_data.read_bytes())
    before = data.read_bytes()
    for force in ([], ["--force"]):
        r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(data), "--out", str(data),
                                 *FAST_PATCH, *force])
        assert_input_error(r, "--data")
    assert data.read_bytes() == before


def test_export_out_is_its_input(runner, tmp_path, patched_ckpt):
    f = tmp_path / "m.safetensors"
    f.write_bytes(patched_ckpt.read_bytes())
    before = f.read_bytes()
    r = runner.invoke(main, ["export", str(f), "--arch", ARCH, "--out", str(f), "--force"])
    assert_input_error(r, "input")
    link = tmp_path / "alias.ts.pt"
    os.link(f, link)  # a hard link to the input is the input too
    r = runner.invoke(main, ["export", str(f), "--arch", ARCH, "--out", str(link), "--force"])
    assert_input_error(r, "input")
    assert f.read_bytes() == before


def test_report_needs_force_and_never_replaces_an_input(runner, tmp_path, patched_ckpt, tiny_test_data):
    rep = tmp_path / "r.json"
    rep.write_text("keep")
    base = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm",
            "--max-samples", "6", "--no-checks", "--quiet"]
    assert_input_error(runner.invoke(main, base + ["--report", str(rep)]), "--force")
    assert rep.read_text() == "keep"
    classes = tmp_path / "classes.json"
    classes.write_text('["0", "1", "2"]')
    r = runner.invoke(main, base + ["--report", str(classes.with_suffix(".json")), "--force", "--classes",
                                    str(classes)])
    assert_input_error(r, "--classes")
    assert classes.read_text() == '["0", "1", "2"]'
    r = runner.invoke(main, base + ["--report", str(rep), "--force"])
    assert r.exit_code == 0, r.output
    assert rep.read_text().startswith("{")


def test_patch_report_cannot_be_the_out_file(runner, tmp_path, tiny_ckpt, tiny_data):
    out = tmp_path / "o.json"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", str(out),
                             "--report", str(out), *FAST_PATCH])
    assert_input_error(r, "--out")


def test_output_that_is_a_device_is_refused(runner, patched_ckpt, tiny_test_data):
    r = runner.invoke(main, ["export", str(patched_ckpt), "--arch", ARCH, "--out", "/dev/null", "--force"])
    assert_input_error(r, "not a regular file")
    assert Path("/dev/null").exists() and not Path("/dev/null").is_file()


# ---------------------------------------------------------------- numbers that lie


def test_non_finite_logits_are_an_error_not_robustness(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    from hardener.patches import Fixer

    real = Fixer.forward
    monkeypatch.setattr(Fixer, "forward", lambda self, h: real(self, h) * float("nan"))
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--no-checks", "--quiet"])
    assert r.exit_code in (2, 3) and "Traceback" not in r.output and "robust" not in r.stdout, r.output
    assert "nan or inf" in r.output.lower()


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_failed_report_write_is_exit_3_and_leaves_nothing(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                          monkeypatch, err):
    import hardener.io.checkpoint as C

    outdir = tmp_path / "reports"
    outdir.mkdir()
    real = os.fsync

    def fail(fd):  # the report's folder fails (read-only, no permission, full); the state folder works
        if str(outdir) in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(err, os.strerror(err))
        real(fd)
    monkeypatch.setattr(C.os, "fsync", fail)
    rep = outdir / "r.json"
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--max-samples", "6", "--no-checks", "--quiet", "--report", str(rep),
                             "--state-dir", str(tmp_path / "state")])
    assert_run_error(r, "r.json", os.strerror(err))
    assert list(outdir.iterdir()) == []


def test_serializer_error_is_exit_3(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def broken(tensors, metadata=None):
        raise SafetensorError("Error while serializing: I/O error")
    monkeypatch.setattr(safetensors.torch, "save", broken)
    out = tmp_path / "o.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", str(out),
                             "--subset", "30", *FAST_PATCH])
    assert_run_error(r, "o.safetensors", "--resume")
    # nothing half-written; the trained state stays, so a rerun with --resume writes without training again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors.partial"]
    monkeypatch.undo()
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", str(out),
                             "--subset", "30", *FAST_PATCH, "--resume"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_disk_full_model_file_in_a_subprocess(tmp_path, patched_ckpt):
    """A real short write: RLIMIT_FSIZE makes writing the exported model fail (EFBIG) like a full disk."""
    import resource

    out = tmp_path / "m.ts.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(hardener.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-m", "hardener", "export", str(patched_ckpt), "--arch", ARCH, "--out",
                        str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512)))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "m.ts.pt" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_leaves_no_temp_file(tmp_path):
    code = ("import os, signal, sys; from pathlib import Path; from hardener.io.checkpoint import atomic_write\n"
            "def w(tmp):\n    open(tmp, 'w').write('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(Path(sys.argv[1]), w)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(hardener.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.json")], env=env, timeout=120)
    assert r.returncode == -9
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    from hardener.io.checkpoint import atomic_write

    stale = tmp_path / ".out.json.999999999.abcd.tmp"  # no such pid
    stale.write_text("")
    mine = tmp_path / f".out.json.{os.getpid()}.abcd.tmp"
    mine.write_text("")
    import hardener.io.checkpoint as C

    real = C._open_unnamed
    C._open_unnamed = lambda folder: None  # the named-temp path (filesystems without O_TMPFILE)
    try:
        atomic_write(tmp_path / "out.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        C._open_unnamed = real
    assert not stale.exists() and mine.exists() and (tmp_path / "out.json").read_text() == "{}"


def test_eval_writes_nothing_into_the_working_directory(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARDEN_CACHE_DIR", raising=False)
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--max-samples", "6", "--no-checks", "--quiet"])
    assert r.exit_code == 0, r.output
    assert list(tmp_path.iterdir()) == []
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--resume",
                             "--quiet"])
    assert_input_error(r, "--state-dir")


def test_nan_loss_in_first_epoch_leaves_no_cache_files(runner, tmp_path, tiny_ckpt, tiny_data):
    out = tmp_path / "out.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", str(out),
                             *FAST_PATCH, "--subset", "30", "--lr", "1e30", "--epochs", "3"])
    assert r.exit_code == 3 and "loss became" in r.output and "Traceback" not in r.output
    left = sorted(p.name for p in tmp_path.iterdir())
    # nothing, or the last good state with its cache (named in the error, for --resume): never an orphan cache
    # (the default recipe attacks the patched model every step, so it has no cache of adversarial examples)
    assert left in ([], ["out.safetensors.partial"], ["out.safetensors.partial",
                                                     "out.safetensors.partial.adv.safetensors"]), left
    if left:
        assert "out.safetensors.partial" in r.output
    assert not out.exists()


def test_unwritable_report_folder_names_the_report_not_the_state(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                                  monkeypatch):
    """State beside the report is a convenience: when it cannot be written the evaluation goes on, and the
    error (exit 3) names the report the user asked for."""
    import hardener.io.checkpoint as C

    def fail(folder):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(C, "_open_unnamed", fail)
    rep = tmp_path / "r.json"
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--max-samples", "6", "--no-checks", "--quiet", "--report", str(rep)])
    assert_run_error(r, "r.json", "permission denied")
    assert "cannot be resumed" in r.output
    assert list(tmp_path.iterdir()) == []
