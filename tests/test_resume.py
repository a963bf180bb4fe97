"""Interrupted runs resume bit-identically; SIGINT saves state and exits 130."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import Interrupted
from hardener.io.resume import Saver
from hardener.patches import PatchedModel
from hardener.training import fit as F

from conftest import (
    ARCH,
    FAST_PATCH,
    HERE,
    assert_input_error,
    fresh_fixed,
    make_data,
    trained_tiny,
)

BASE = trained_tiny()


def _fresh() -> PatchedModel:
    return fresh_fixed(BASE)


def _stopper(after: int):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == after
    return stop


@pytest.mark.parametrize("adversary,augment,ema", [("base", False, 0.0), ("patched", True, 0.0),
                                                  ("patched", False, 0.8)])
def test_interrupted_at_random_points_resumes_bit_identical(tmp_path, adversary, augment, ema):
    imgs, labels = make_data(n=48, seed=4)
    ds = hdata.Dataset(imgs, labels)
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    cfg = F.FitConfig(epochs=3, batch_size=16, adversary=adversary, augment=augment, ema=ema)  # 9 steps
    ref = _fresh()
    F.fit(ref, ds, spec, cfg, torch.device("cpu"))

    path = tmp_path / "run.partial"
    points = sorted(random.Random(f"{adversary}{ema}").sample(range(1, 9), 3))
    done, resume, interruptions = 0, False, 0
    while True:
        p = _fresh()
        saver = Saver(path, fingerprint="x", resume=resume)
        remaining = [q - done for q in points if q > done]
        # the first run also polls stop() once per batch while it caches the base's adversarial examples
        warmup = 3 if adversary == "base" and not saver.adv_path.exists() else 0
        try:
            F.fit(p, ds, spec, cfg, torch.device("cpu"), saver=saver,
                  stop=_stopper(warmup + remaining[0]) if remaining else (lambda: False))
            break
        except Interrupted:
            interruptions += 1
            done += remaining[0]
            resume = True
    assert interruptions == 3
    for k, v in ref.patch_state_dict().items():
        assert torch.equal(p.patch_state_dict()[k], v), k


def test_spilled_adversarials_resume_bit_identical(tmp_path):
    """Adversarial examples larger than --cache-limit go to disk in fp16; a resumed run reads the same file."""
    imgs, labels = make_data(n=48, seed=4)
    ds = hdata.Dataset(imgs, labels)
    spec = A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3)
    cfg = F.FitConfig(epochs=2, batch_size=16, cache_limit=1000)
    ref = _fresh()
    F.fit(ref, ds, spec, cfg, torch.device("cpu"), saver=Saver(tmp_path / "ref.partial", fingerprint="r"),
          cache_dir=tmp_path)
    path = tmp_path / "run.partial"
    saver = Saver(path, fingerprint="x")
    with pytest.raises(Interrupted):
        F.fit(_fresh(), ds, spec, cfg, torch.device("cpu"), saver=saver, stop=_stopper(3 + 4), cache_dir=tmp_path)
    assert saver.spill_done() and not saver.adv_path.exists()
    p = _fresh()
    F.fit(p, ds, spec, cfg, torch.device("cpu"), saver=Saver(path, fingerprint="x", resume=True), cache_dir=tmp_path)
    for k, v in ref.patch_state_dict().items():
        assert torch.equal(p.patch_state_dict()[k], v), k
    saver.clear()
    assert not saver.spill_path.exists()
    assert not list(tmp_path.glob(".harden-*"))  # temporary caches are gone


def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "run.partial"
    Saver(path, fingerprint="a").save({"epoch": 0})
    with pytest.raises(Exception, match="settings differ"):
        Saver(path, fingerprint="b", resume=True).load()


def _cli(tmp_path, out, *extra):
    data = tmp_path / "d.npz"
    if not data.exists():
        import numpy as np
        imgs, labels = make_data(n=300, seed=9)
        np.savez(data, images=imgs.numpy(), labels=labels.numpy())
    ckpt = tmp_path / "base.safetensors"
    if not ckpt.exists():
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in BASE.state_dict().items()}, str(ckpt))
    return ["patch", str(ckpt), "--arch", ARCH, "--data", str(data), "--subset", "240", "--at", "features,block",
            "--out", str(out), *FAST_PATCH, "--epochs", "20", "--batch-size", "16", "--adversary", "patched", *extra]


def test_sigint_saves_state_and_resume_matches_uninterrupted(tmp_path, runner):
    ref = tmp_path / "ref.safetensors"
    r = runner.invoke(main, _cli(tmp_path, ref))
    assert r.exit_code == 0, r.output

    out = tmp_path / "out.safetensors"
    partial = out.with_name(out.name + ".partial")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rng = random.Random(1)
    for i in range(3):
        before = partial.stat().st_mtime_ns if partial.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "hardener", *_cli(tmp_path, out, *(["--resume"] if i else []))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and (not partial.exists() or partial.stat().st_mtime_ns == before):
            time.sleep(0.05)  # training is under way once an epoch's state has been saved
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "--resume" in err
        assert partial.exists() and not out.exists()
    r = runner.invoke(main, _cli(tmp_path, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ref.read_bytes()
    assert not partial.exists()


def test_leftover_state_needs_resume(runner, tmp_path):
    out = tmp_path / "o.safetensors"
    out.with_name(out.name + ".partial").write_bytes(b"x")
    r = runner.invoke(main, _cli(tmp_path, out))
    assert_input_error(r, "--resume")
    r = runner.invoke(main, _cli(tmp_path, tmp_path / "other.safetensors", "--resume"))
    assert_input_error(r, "nothing to resume")


def test_interrupted_eval_resumes_to_the_same_report(tmp_path, patched_ckpt, tiny_test_data, monkeypatch, runner):
    """Ctrl-C in the middle of an evaluation keeps the finished batches; --resume gives the same numbers."""
    import json

    from hardener.evaluation import threats as E

    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd,fgsm",
            "--eps", "0.15", "--steps", "3", "--batch-size", "8", "--no-checks", "--json", "--quiet",
            "--state-dir", str(state)]
    ref = json.loads(runner.invoke(main, args).stdout)

    real = E.A.Attack.__call__
    calls = {"n": 0}

    def flaky(self, x, y):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, x, y)
    monkeypatch.setattr(E.A.Attack, "__call__", flaky)
    r = runner.invoke(main, args)
    assert r.exit_code == 130 and "--resume" in r.output
    assert len(list(state.glob(".harden-eval-*.partial"))) == 1
    assert not list(tmp_path.glob(".harden-eval-*"))  # never the working directory
    again = runner.invoke(main, args)
    assert_input_error(again, "--resume")
    monkeypatch.setattr(E.A.Attack, "__call__", real)
    resumed = runner.invoke(main, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    got = json.loads(resumed.stdout)
    for name in ("base", "patched"):
        for t in ref["models"][name]["threats"]:
            a = [r["robust_after"] for r in ref["models"][name]["threats"][t]["attacks"]]
            b = [r["robust_after"] for r in got["models"][name]["threats"][t]["attacks"]]
            assert a == b
        assert got["models"][name]["worst_case"] == ref["models"][name]["worst_case"]
    assert not list(state.glob(".harden-eval-*.partial"))


def test_nan_loss_keeps_last_good_state_and_resume_continues(tmp_path, runner, monkeypatch):
    from hardener.methods import losses

    out = tmp_path / "nan.safetensors"
    real = losses.focal_ce
    calls = {"n": 0}

    def poisoned(logits, y, gamma=0.0):
        calls["n"] += 1
        loss = real(logits, y, gamma)
        return loss * float("nan") if calls["n"] == 2 * 15 * 2 + 3 else loss  # 2 CE terms x 15 steps x 2 epochs
    monkeypatch.setattr(losses, "focal_ce", poisoned)
    r = runner.invoke(main, _cli(tmp_path, out, "--epochs", "4"))
    assert r.exit_code == 3 and "loss became nan" in r.output.lower(), r.output
    partial = out.with_name(out.name + ".partial")
    assert partial.exists() and not out.exists()
    assert torch.load(partial, weights_only=True)["epoch"] == 2  # the last good state: end of epoch 2
    monkeypatch.setattr(losses, "focal_ce", real)
    r = runner.invoke(main, _cli(tmp_path, out, "--epochs", "4", "--resume"))
    assert r.exit_code == 0, r.output
    assert out.exists() and not partial.exists()
