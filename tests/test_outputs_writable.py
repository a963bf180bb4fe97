"""Issue 35, item 3 (part): outputs are checked writable before any work; a read-only folder is exit 3, nothing left."""
from __future__ import annotations

import subprocess

import pytest

from hardener import fit as F
from hardener.cli import main

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

    from hardener import validate as V
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
