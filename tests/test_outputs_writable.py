"""Issue 35, item 3 (part): outputs are checked writable before any work; a read-only folder is exit 3, nothing left."""
from __future__ import annotations

import subprocess

import pytest

from hardener.cli.app import main
from hardener.training import fit as F

from conftest import ARCH, assert_run_error


@pytest.fixture()
def ro_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ro: as root, chmod would not stop a write)."""
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_read_only_out_fails_before_training(runner, tmp_path, tiny_ckpt, tiny_data, ro_dir, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(F, "fit", no_training)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out",
                             str(ro_dir / "o.safetensors"), "--epochs", "1", "--quiet"])
    assert_run_error(r, "--out", "read-only file system")
    assert list(ro_dir.iterdir()) == []
    report = tmp_path / "r.json"  # a read-only --report folder too, with a writable --out
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out",
                             str(tmp_path / "o.safetensors"), "--report", str(ro_dir / "r.json"), "--quiet"])
    assert_run_error(r, "--report")
    assert not (tmp_path / "o.safetensors").exists() and not report.exists()


def test_read_only_report_of_eval_fails_before_attacks(runner, patched_ckpt, tiny_test_data, ro_dir):
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--report", str(ro_dir / "r.md"), "--quiet", "--no-checks"])
    assert_run_error(r, "--report", "read-only")


def test_second_run_to_the_same_out_refuses(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch):
    import sys
    import time

    from hardener.cli import boundary as V
    from hardener.errors import RunError

    out = tmp_path / "o.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / ".o.safetensors.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # another run holds --out
        args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", str(out), "--quiet"]
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and "another harden run" in r.output, r.output
    finally:
        holder.kill()
        holder.wait()
    t0 = time.time()

    def failed_run(*a, **k):
        raise RunError("stopped here")

    monkeypatch.setattr(F, "fit", failed_run)  # the lock is free now; this run gets past it, and releases it
    r = runner.invoke(main, args)
    assert r.exit_code == 3 and "stopped here" in r.output, r.output
    assert not (tmp_path / ".o.safetensors.lock").exists() and not V._LOCKS
    assert time.time() - t0 < 120


@pytest.fixture()
def full_dir(tmp_path):
    """A file system with 64 kB: room for a probe file, not for a checkpoint and its margin."""
    d = tmp_path / "full"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_full_file_system_fails_before_training(runner, tiny_ckpt, tiny_data, full_dir, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(F, "fit", no_training)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out",
                             str(full_dir / "o.safetensors"), "--epochs", "1", "--quiet"])
    assert_run_error(r, "--out", "not enough free space")
    assert list(full_dir.iterdir()) == []


# ---------------------------------------------------------------- no output is an input (issue 35, item 3)


def _patch(tiny_ckpt, tiny_data, *extra) -> list[str]:
    return ["patch", str(tiny_ckpt), "--data", str(tiny_data), "--quiet", "--force", *extra]


def test_no_output_is_a_file_the_run_reads(runner, tmp_path, tiny_ckpt, tiny_data, patched_ckpt, tiny_test_data):
    """Each class of read file once, with --force: the arch file, preprocessor, unlabeled data, class map, config
    file, a file of an input folder (a Hugging Face folder's config.json), through a symlink and a hard link."""
    import os
    import shutil

    from conftest import assert_input_error

    arch = tmp_path / "net.py"
    shutil.copy(ARCH.rsplit(":", 1)[0], arch)
    pre = tmp_path / "preprocessor_config.json"
    pre.write_text('{"image_mean": [0.5], "image_std": [0.5]}')
    classes = tmp_path / "classes.json"
    classes.write_text('["a", "b", "c"]')
    toml = tmp_path / "harden.toml"
    toml.write_text("")
    unlabeled = tmp_path / "pool.npz"
    shutil.copy(tiny_data, unlabeled)
    link, hard = tmp_path / "link.npz", tmp_path / "hard.npz"
    link.symlink_to(unlabeled)
    os.link(unlabeled, hard)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "x"}')
    a = f"{arch}:tiny"
    cases = [
        (_patch(tiny_ckpt, tiny_data, "--arch", a, "--out", str(arch)), "--arch"),
        (["export", str(patched_ckpt), "--arch", a, "--out", str(arch), "--force"], "--arch"),
        (["certify", str(tiny_ckpt), "--arch", a, "--data", str(tiny_test_data), "--tsv", str(arch)], "--arch"),
        (_patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--preprocessor", str(pre), "--report",
                str(tmp_path / "preprocessor_config.json")), "--preprocessor"),
        (_patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--unlabeled", str(unlabeled), "--out", str(link)),
         "--unlabeled"),
        (_patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--unlabeled", str(unlabeled), "--out", str(hard)),
         "--unlabeled"),
        (["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--classes", str(classes),
          "--report", str(tmp_path / "r.json"), "--report", str(classes), "--force"], "--classes"),
        (_patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--config", str(toml), "--out", str(toml)), "--config"),
        (["eval", str(hf), "--data", str(tiny_test_data), "--report", str(hf / "config.json"), "--force"], "MODEL"),
    ]
    for args, flag in cases:
        assert_input_error(runner.invoke(main, args), flag)
    assert (hf / "config.json").read_text() == '{"model_type": "x"}' and arch.read_text().startswith('"""')
    assert pre.read_text().startswith("{") and classes.read_text() == '["a", "b", "c"]' and toml.read_text() == ""


def test_outputs_never_take_harden_side_file_names(runner, tmp_path, tiny_ckpt, tiny_data, patched_ckpt,
                                                   tiny_test_data):
    """harden's own state, cache and lock names are never an output, and a user's file at a side-file name of --out
    (with no interrupted run there) is never replaced or deleted."""
    from conftest import assert_input_error

    out = tmp_path / "o.safetensors"
    state = tmp_path / "st"
    state.mkdir()
    for args in (["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--tsv",
                  str(tmp_path / "o.safetensors.partial")],
                 _patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--out", str(tmp_path / "x.partial")),
                 ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--tsv",
                  str(tmp_path / ".o.safetensors.lock")],
                 ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--state-dir", str(state),
                  "--report", str(state / ".harden-eval-0123456789abcdef.json")]):
        r = runner.invoke(main, args)
        assert_input_error(r, "named like harden's own")
    mine = tmp_path / "o.safetensors.partial.adv.npy"
    mine.write_bytes(b"user data")
    assert_input_error(runner.invoke(main, _patch(tiny_ckpt, tiny_data, "--arch", ARCH, "--out", str(out))),
                       "o.safetensors.partial.adv.npy", "no part of an interrupted run")
    assert mine.read_bytes() == b"user data" and not out.exists()
    cache = tmp_path / "cache"
    cache.mkdir()
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data),
                             "--base-cache", str(cache), "--report", str(cache / "r.json")])
    assert_input_error(r, "--base-cache")
