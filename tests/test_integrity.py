"""Files harden writes for itself and reads back (issue 35, item 2): resume states, evaluation and certification
states, --base-cache entries and saved adversarial examples carry a digest over their content and the run's
fingerprint. An edited, truncated, foreign or digest-less file is exit 2 with one line naming it; an untouched one
is used as before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.errors import InputError, Interrupted
from hardener.io import integrity as I
from hardener.io.resume import EvalStore, Saver
from hardener.training import fit as F

from conftest import ARCH, assert_input_error, fresh_fixed, make_data, trained_tiny

BASE = trained_tiny()


def _edit_state(path: Path, change) -> None:
    """Change a saved torch state in place, its digest left as it was (what a hand edit does)."""
    st = torch.load(path, weights_only=True)
    before = I.digest("", st)
    change(st)
    assert I.digest("", st) != before, "the edit changed nothing"
    torch.save(st, path)


def _edit_safetensors(path: Path, name: str, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    old, t[name] = t[name], change(t[name]).contiguous()
    assert not torch.equal(old, t[name]), "the edit changed nothing"
    save_file(t, str(path), metadata=meta)


# ---------------------------------------------------------------- the library's files


def test_state_digest_covers_content_and_fingerprint(tmp_path):
    path = tmp_path / "run.partial"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 1, "logs": [{"loss": 0.5}], "best": None,
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    Saver(path, fingerprint="a").save(state)
    got = Saver(path, fingerprint="a", resume=True).load()
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["epoch"] == 1
    assert I.DIGEST_KEY not in got  # the digest is checked, not handed on
    with pytest.raises(InputError, match="settings differ"):  # a state from another run's options
        Saver(path, fingerprint="b", resume=True).load()
    for change in (lambda st: st["model"]["w"].__setitem__((0, 0), 9.0), lambda st: st.update(epoch=0),
                   lambda st: st["optimizer"]["state"][0].update(step=torch.tensor(4.0)),
                   lambda st: st.update(fingerprint="b")):
        Saver(path, fingerprint="a").save(state)
        _edit_state(path, change)
        with pytest.raises(InputError, match="integrity digest|settings differ") as e:
            Saver(path, fingerprint="a", resume=True).load()
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_state_without_digest_is_refused_as_older(tmp_path):
    path = tmp_path / "run.partial"
    torch.save({"version": 3, "fingerprint": "a", "epoch": 1}, path)  # what 0.x before the digest wrote
    with pytest.raises(InputError, match="no integrity digest.*older harden version.*deleted"):
        Saver(path, fingerprint="a", resume=True).load()


def test_truncated_state_is_refused(tmp_path):
    path = tmp_path / "run.partial"
    Saver(path, fingerprint="a").save({"model": {"w": torch.zeros(50)}, "epoch": 1})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match="run.partial"):
        Saver(path, fingerprint="a", resume=True).load()


def test_eval_store_refuses_edited_state(tmp_path):
    path = tmp_path / ".harden-eval-x.partial"
    store = EvalStore(path, "fp", resume=False)
    store.put("whitebox/0:pgd", {"robust": torch.tensor([True, False, False]), "row": None, "k": 1}, force=True)
    assert EvalStore(path, "fp", resume=True).get("whitebox/0:pgd")["k"] == 1
    _edit_state(path, lambda st: st["data"]["whitebox/0:pgd"]["robust"].fill_(True))  # every sample "robust"
    with pytest.raises(InputError, match="integrity digest"):
        EvalStore(path, "fp", resume=True)


def test_saved_adversarial_examples_are_checked(tmp_path):
    saver = Saver(tmp_path / "run.partial", fingerprint="a")
    adv = torch.rand(4, 1, 8, 8)
    saver.save_adv(adv)
    assert torch.equal(saver.load_adv(), adv)
    _edit_safetensors(saver.adv_path, "adv", lambda t: t * 0)  # clean images in place of the examples
    with pytest.raises(InputError, match="adv.safetensors.*integrity digest"):
        saver.load_adv()
    saver.save_adv(adv)
    with pytest.raises(InputError, match="another run"):
        Saver(tmp_path / "run.partial", fingerprint="b").load_adv()
    save_file({"adv": adv}, str(saver.adv_path), metadata={"fingerprint": "a"})  # an older version's file
    with pytest.raises(InputError, match="no integrity digest"):
        saver.load_adv()


def test_spilled_adversarial_examples_are_checked(tmp_path):
    """Examples over --cache-limit go to `<out>.partial.adv.npy`; a resumed run checks the file against its tag."""
    imgs, labels = make_data(n=32, seed=4)
    ds = hdata.Dataset(imgs, labels)
    spec = A.AttackSpec("pgd", eps=0.1, steps=1, n_classes=3)
    cfg = F.FitConfig(epochs=1, batch_size=16, cache_limit=1000)
    saver = Saver(tmp_path / "run.partial", fingerprint="x")
    calls = {"n": 0}

    def stop() -> bool:  # after the examples (2 batches) and one training step
        calls["n"] += 1
        return calls["n"] == 3
    with pytest.raises(Interrupted):
        F.fit(fresh_fixed(BASE), ds, spec, cfg, torch.device("cpu"), saver=saver, stop=stop, cache_dir=tmp_path)
    assert saver.spill_done()
    arr = np.load(saver.spill_path, mmap_mode="r+")
    arr[0] = 0  # one image's examples replaced by zeros
    arr.flush()
    del arr
    resumed = Saver(saver.path, fingerprint="x", resume=True)
    with pytest.raises(InputError, match="adv.npy.*integrity digest"):
        F.fit(fresh_fixed(BASE), ds, spec, cfg, torch.device("cpu"), saver=resumed, cache_dir=tmp_path)
    saver.spill_path.with_name(saver.spill_path.name + ".done").write_text("x")  # an older version's bare fingerprint
    with pytest.raises(InputError, match="no integrity digest.*older harden version"):
        resumed.spill_done()


# ---------------------------------------------------------------- through the command line


def _patch_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    data, ckpt = tmp_path / "d.npz", tmp_path / "base.safetensors"
    if not data.exists():
        imgs, labels = make_data(n=96, seed=9)
        np.savez(data, images=imgs.numpy(), labels=labels.numpy())
        save_file({k: v.contiguous() for k, v in BASE.state_dict().items()}, str(ckpt))
    return ["patch", str(ckpt), "--arch", ARCH, "--data", str(data), "--subset", "64", "--at", "block", "--out",
            str(out), "--epochs", "3", "--steps", "1", "--eps", "0.1", "--eval-samples", "8", "--eval-steps", "1",
            "--batch-size", "16", "--adversary", "base", "--quiet", *extra]


def test_patch_resume_refuses_edited_files_and_resumes_untouched_ones(tmp_path, runner, monkeypatch):
    from hardener.io import resume

    ref = tmp_path / "ref.safetensors"
    r = runner.invoke(main, _patch_args(tmp_path, ref))
    assert r.exit_code == 0, r.output
    out = tmp_path / "o.safetensors"
    partial = out.with_name(out.name + ".partial")
    adv = partial.with_name(partial.name + ".adv.safetensors")
    monkeypatch.setattr(resume.StopFlag, "__bool__", lambda self: partial.exists())  # Ctrl-C after epoch 1
    r = runner.invoke(main, _patch_args(tmp_path, out))
    assert r.exit_code == 130 and partial.exists() and adv.exists(), r.output
    monkeypatch.undo()
    good_state, good_adv = partial.read_bytes(), adv.read_bytes()

    _edit_state(partial, lambda st: next(iter(st["model"].values())).add_(0.5))
    assert_input_error(runner.invoke(main, _patch_args(tmp_path, out, "--resume")), str(partial), "delete it")
    partial.write_bytes(good_state[: len(good_state) // 2])  # truncated
    assert_input_error(runner.invoke(main, _patch_args(tmp_path, out, "--resume")), str(partial), "delete it")
    partial.write_bytes(good_state)
    _edit_safetensors(adv, "adv", lambda t: t.flip(0))  # the examples of other images
    assert_input_error(runner.invoke(main, _patch_args(tmp_path, out, "--resume")), str(adv), "delete it")
    adv.write_bytes(good_adv)
    assert_input_error(runner.invoke(main, _patch_args(tmp_path, out, "--resume", "--lr", "0.002")),
                       "settings differ", str(partial))
    r = runner.invoke(main, _patch_args(tmp_path, out, "--resume"))  # untouched: resumes as before
    assert r.exit_code == 0, r.output
    got, want = load_file(str(out)), load_file(str(ref))  # the same weights as the uninterrupted run
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not partial.exists() and not adv.exists()


def test_eval_resume_refuses_edited_state(tmp_path, runner, monkeypatch, patched_ckpt, tiny_test_data):
    from hardener.evaluation import threats as E

    state = tmp_path / "state"
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd,fgsm",
            "--eps", "0.15", "--steps", "2", "--batch-size", "8", "--no-checks", "--json", "--quiet",
            "--state-dir", str(state)]
    real, calls = E.A.Attack.__call__, {"n": 0}

    def flaky(self, x, y):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(self, x, y)
    monkeypatch.setattr(E.A.Attack, "__call__", flaky)
    assert runner.invoke(main, args).exit_code == 130
    monkeypatch.undo()
    [partial] = state.glob(".harden-eval-*.partial")

    def all_robust(st):  # what would make a resumed report lie: every sample left robust
        for v in st["data"].values():
            v["robust"].fill_(True)
    _edit_state(partial, all_robust)
    assert_input_error(runner.invoke(main, args + ["--resume"]), str(partial), "delete it")


def test_certify_resume_refuses_edited_state(tmp_path, runner, monkeypatch, tiny_ckpt, tiny_test_data):
    from hardener.certification import smoothing as C

    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0",
            "10", "--n", "50", "--max-samples", "6", "--quiet", "--state-dir", str(tmp_path / "st"), "--report",
            str(tmp_path / "r.json")]
    real, calls = C.Smoothed.certify_row, []

    def flaky(self, x, index):
        calls.append(index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, x, index)
    monkeypatch.setattr(C.Smoothed, "certify_row", flaky)
    assert runner.invoke(main, args).exit_code == 130
    monkeypatch.undo()
    [partial] = (tmp_path / "st").glob(".harden-certify-*.partial")

    def larger_radius(st):
        for row in st["data"]["rows"]["rows"]:
            row["radius"] = 9.0
    _edit_state(partial, larger_radius)
    assert_input_error(runner.invoke(main, args + ["--resume"]), str(partial), "delete it")


EVAL = ["--attack", "pgd", "--steps", "2", "--eps", "0.2", "--threat", "whitebox,transfer", "--batch-size", "16",
        "--no-checks", "--quiet", "--json"]


def test_base_cache_refuses_edited_entries(tmp_path, runner, patched_ckpt, tiny_test_data):
    cache = tmp_path / "cache"
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), *EVAL, "--base-cache", str(cache)]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    folder = Path(json.loads(first.stdout)["base_cache"]["dir"])
    base, transfer = folder / "base.pt", sorted(folder.glob("transfer-*.safetensors"))
    assert base.exists() and len(transfer) >= 2
    saved = {p: p.read_bytes() for p in [base, *transfer]}
    again = runner.invoke(main, args)  # untouched: reused
    assert again.exit_code == 0 and json.loads(again.stdout)["base_cache"]["transfer_batches_reused"] == len(transfer)

    _edit_state(base, lambda st: st["result"]["_masks"]["clean"][:5].fill_(False))
    assert_input_error(runner.invoke(main, args), str(base), "delete it")
    base.write_bytes(saved[base])
    _edit_safetensors(transfer[0], "adv", lambda t: t.clamp(0.2, 0.8))
    assert_input_error(runner.invoke(main, args), str(transfer[0]), "delete it")
    transfer[0].write_bytes(saved[transfer[1]])  # another batch's examples under this batch's name
    assert_input_error(runner.invoke(main, args), str(transfer[0]), "another run")
    transfer[0].write_bytes(saved[transfer[0]][:100])  # truncated
    assert_input_error(runner.invoke(main, args), str(transfer[0]))
    transfer[0].unlink()  # deleting it is the way out: computed again
    r = runner.invoke(main, args)
    assert r.exit_code == 0 and json.loads(r.stdout)["base_cache"]["transfer_batches_computed"] == 1
