"""The library: what the CLI does, a notebook does in a few lines (issue 15's public API, first part)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hardener
from hardener.errors import InputError

from conftest import ARCH, make_data, trained_tiny


def _data(n=90, seed=0):
    imgs, labels = make_data(n=n, seed=seed)
    return imgs.float() / 255, labels


FAST = dict(eps=0.1, epochs=2, steps=2, batch_size=32, select_on=10)


def test_readme_library_example_end_to_end(tmp_path):
    net = trained_tiny()
    x, y = _data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    patched = hardener.patch(net, (x, y), **FAST)
    assert patched.training_record["preset"]["name"] == "robust"
    assert patched.training_record["split"]["validation"] == 10 and len(patched.history) == 2
    assert "patch parameters" in patched.summary()
    # frozen means frozen, and a patch disabled is exactly the base
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    xt, yt = _data(45, seed=7)
    with torch.no_grad(), patched.patches_disabled():
        assert torch.equal(patched(xt), net(xt))
    report = hardener.evaluate(patched, (xt, yt), attacks="apgd-ce", eps=0.1, steps=3, checks=False,
                               threat="whitebox,transfer")
    assert 0 <= report.robust <= report.clean <= 1 and report.transfer is not None and report.blackbox is None
    assert report.base_robust is not None and "robust (white-box)" in repr(report)
    assert '"schema"' in report.to_json() and report.to_markdown() and "<html" in report.to_html().lower()
    # typed enough for a notebook and a tracker: numbers only in summary, the JSON as a dict, HTML for display
    summary = report.summary
    assert summary and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in summary.values())
    assert report.to_dict() == json.loads(report.to_json()) and report._repr_html_() == report.to_html()
    assert patched.cost is not None and patched.train_seconds > 0 and patched.manifest is None
    path = tmp_path / "tiny.hardened.safetensors"
    patched.save(path, arch=ARCH)
    again = hardener.load(path, arch=ARCH)
    with torch.no_grad():
        assert torch.equal(again(xt), patched(xt))
    assert again.manifest.training["preset"]["name"] == "robust"


def test_dataloader_torch_dataset_and_path_are_data(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    a = hardener.as_dataset(loader)
    b = hardener.as_dataset(TensorDataset(x, y))
    assert torch.equal(a.images, x) and torch.equal(a.labels, y) and torch.equal(b.images, x)
    patched = hardener.patch(trained_tiny(), loader, recipe="transfer", eps=0.1, epochs=1, steps=1, batch_size=32,
                             at="block")
    assert patched.training_record["preset"]["name"] == "transfer" and list(patched.sites) == ["block"]
    with pytest.raises(InputError, match="cannot use"):
        hardener.as_dataset(42)
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        hardener.as_dataset((x * 255, y))
    with pytest.raises(InputError, match="unknown option 'epoch'"):
        hardener.patch(trained_tiny(), (x, y), epoch=3)


def test_an_attack_alone():
    net = trained_tiny()
    x, y = _data(30)
    atk = hardener.attacks.get("apgd-ce", eps=0.1, steps=5, n_classes=3)
    adv = atk(net, x, y)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (net(adv).argmax(1) == y).float().mean() <= (net(x).argmax(1) == y).float().mean()
    with pytest.raises(InputError, match="suite"):
        hardener.attacks.get("autoattack", eps=0.1)


def test_readme_library_example_runs_as_written(tmp_path, monkeypatch):
    """The README's library example, executed as written from the repository root (outputs into tmp_path)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    code = re.search(r"<!-- library-example -->\n```python\n(.*?)```", text, re.S).group(1)
    for name in ("library-report.md", "fmnist.hardened.safetensors"):
        code = code.replace(f'"{name}"', repr(str(tmp_path / name)))
    monkeypatch.chdir(root)
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "library-report.md").read_text().strip()
    assert hardener.load(tmp_path / "fmnist.hardened.safetensors",
                         arch="examples/fmnist_model.py:resnet9_small").manifest.training["preset"]["name"] == "robust"


def test_load_takes_plain_checkpoints_too(tiny_ckpt):
    net = trained_tiny()
    plain = hardener.load(tiny_ckpt, arch=ARCH)
    assert plain.manifest is None and not plain.sites
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))


def test_review_regressions_library(monkeypatch):
    x, y = _data()
    # an explicit recipe is never mixed with the default preset
    p = hardener.patch(trained_tiny(), (x, y), at="block", eps=0.1, epochs=1, steps=1, batch_size=32)
    assert p.training_record["preset"] is None and list(p.sites) == ["block"]
    assert p.training_record["threat_model"] == "transfer"
    # values out of range are input errors, not hangs or tracebacks
    with pytest.raises(InputError, match="batch_size"):
        hardener.patch(trained_tiny(), (x, y), batch_size=0)
    with pytest.raises(InputError, match="batch_size"):
        hardener.evaluate(trained_tiny(), (x, y), attacks="fgsm", eps=0.1, batch_size=0)
    with pytest.raises(InputError, match="labels"):
        hardener.as_dataset((x, torch.full_like(y, -1)))


def test_library_unlabeled_images_and_rest():
    x, y = _data()
    xu, _ = _data(30, seed=4)
    patched = hardener.patch(trained_tiny(), (x, y), unlabeled=xu, pseudo_ratio=0.5, **FAST)
    rec = patched.training_record["split"]["unlabeled"]
    assert rec["pool"] == 30 and rec["kept"] == 30 and "agreement_with_pool_labels" not in rec
    assert patched.training_record["config"]["labelled"] == 72  # 90 minus the 18 held out (--holdout 20%)
    patched = hardener.patch(trained_tiny(), (x, y), subset=40, unlabeled="rest", **FAST)
    rec = patched.training_record["split"]["unlabeled"]
    assert rec["pool"] == 40 and 0 <= rec["agreement_with_pool_labels"] <= 1  # 90 - 40 train - 10 validation
    with pytest.raises(InputError, match="pseudo_threshold"):
        hardener.patch(trained_tiny(), (x, y), unlabeled=xu, pseudo_threshold=2.0, **FAST)


def test_logged_distill_is_what_the_distillation_terms_add_to_the_loss():
    # The robust preset trains with mu = 2.5 and lam = 0: its logged `distill` is mu * KL(base || patched), not 0, and
    # the logged parts add up to the loss (fixer loss: CE clean + CE adversarial + distillation).
    x, y = _data(n=60, seed=2)
    patched = hardener.patch(trained_tiny(), (x, y), eps=0.1, epochs=2, steps=1, batch_size=20, select_on=0, holdout=0)
    assert patched.training_record["config"]["mu"] == 2.5
    for log in patched.history:
        assert log.distill > 0
        assert abs(log.loss - (log.ce_clean + log.ce_adv + log.distill)) < 1e-4 * max(1.0, log.loss)
    none = hardener.patch(trained_tiny(), (x, y), eps=0.1, epochs=1, steps=1, batch_size=20, select_on=0, holdout=0,
                          mu=0.0)
    assert all(log.distill == 0 for log in none.history)


def _quick_patch(net, **kw):
    """A fixer at `block` after one short epoch (the transfer recipe): patches that change the logits."""
    return hardener.patch(net, _data(), recipe="transfer", eps=0.1, epochs=1, steps=1, batch_size=32, at="block", **kw)


def test_patched_model_declares_what_a_run_or_a_load_leaves_on_it():
    from hardener.model.classifier import Classifier, InputSpec

    fresh = hardener.PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    assert all(getattr(fresh, k) is None for k in ("base_sha256", "manifest", "training_record", "history",
                                                       "train_seconds", "cost", "arch", "arch_kwargs"))


def test_save_remembers_the_arch_and_warns_without_one(tmp_path):
    import warnings

    from hardener.io.checkpoint import read_manifest

    x = _data(30, seed=5)[0]
    patched = _quick_patch(trained_tiny(), arch=ARCH)
    assert patched.arch == ARCH
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # arch is remembered: no warning
        patched.save(tmp_path / "a.safetensors")
    again = hardener.load(tmp_path / "a.safetensors", trust_arch=True)  # the recorded arch, trusted
    assert again.manifest.arch == ARCH and again.arch == ARCH
    with torch.no_grad():
        assert torch.equal(again(x), patched(x))
        with patched.patches_disabled():
            assert not torch.equal(again(x), patched(x))  # the patch matters, so the round trip means something
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and a loaded model remembers it too
        again.save(tmp_path / "b.safetensors")
    assert read_manifest(tmp_path / "b.safetensors").arch == ARCH
    bare = _quick_patch(trained_tiny())
    with pytest.warns(UserWarning, match="without an architecture: load it with hardener.load\\(path, model="):
        bare.save(tmp_path / "c.safetensors")
    assert read_manifest(tmp_path / "c.safetensors").arch is None


def test_load_attaches_a_files_patches_to_a_module_you_built(tmp_path):
    import tiny_model

    net = trained_tiny()
    base_sd = {k: v.clone() for k, v in net.state_dict().items()}
    patched = _quick_patch(net)
    path = tmp_path / "p.safetensors"
    with pytest.warns(UserWarning):
        patched.save(path)
    x = _data(30, seed=5)[0]
    mine = tiny_model.tiny().eval()  # (a forward in train mode would move its BN statistics: another base)
    mine.load_state_dict(base_sd)
    with torch.no_grad():
        plain = mine(x)
    loaded = hardener.load(path, model=mine)
    assert isinstance(loaded, hardener.PatchedModel) and loaded.net is mine and list(loaded.sites) == ["block"]
    assert loaded.manifest.patches and loaded.arch is None
    with torch.no_grad():
        assert torch.equal(loaded(x), patched(x))
        with loaded.patches_disabled():  # the base, exactly
            assert torch.equal(loaded(x), loaded.model(x)) and torch.equal(mine(x), plain)
    assert all(torch.equal(v, base_sd[k]) for k, v in mine.state_dict().items())  # the base untouched

    other = tiny_model.tiny()  # same architecture, other weights
    with pytest.raises(InputError, match="model= is not the base .* tensor '.*' holds other values"):
        hardener.load(path, model=other)
    nudged = tiny_model.tiny()
    nudged.load_state_dict(base_sd)
    with torch.no_grad():  # one weight one ulp away: bit-exact means bit-exact
        w = nudged.head[3].weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    with pytest.raises(InputError, match="tensor 'head.3.weight' holds other values"):
        hardener.load(path, model=nudged)
    with pytest.raises(InputError, match="tensor 'block.0.bias' is float32 of shape \\(16,\\), the file's float32 of "
                                         "shape \\(8,\\)"):
        hardener.load(path, model=tiny_model.tiny(width=8))
    with pytest.raises(InputError, match="it lacks the file's tensor '.*' \\(\\d+ missing, 2 extra\\)"):
        hardener.load(path, model=torch.nn.Linear(4, 3))
    with pytest.raises(InputError, match="give model= or arch=, not both"):
        hardener.load(path, model=mine, arch=ARCH)
    # `mine` is hooked now: a second load onto it, or patching a copy of it, would run the first load's patches too
    with pytest.raises(InputError, match="model= already carries the patches of a PatchedModel"):
        hardener.load(path, model=mine)
    for call in (lambda: hardener.patch(mine, _data(30), epochs=1, progress=False),
                 lambda: hardener.evaluate(mine, _data(30), progress=False)):
        with pytest.raises(InputError, match="the module carries the patches of a PatchedModel"):
            call()
    assert hardener.evaluate(loaded, _data(30), "apgd-ce", steps=2, progress=False).clean is not None


def test_the_training_record_is_typed_and_is_what_the_checkpoint_stores(tmp_path):
    """Issue 31, item 3: `hardener.patch` leaves a `TrainingRecord` on the model; its `to_dict()` is the manifest's
    "training" object, byte for byte once saved, and fields read as the dict had them."""
    from hardener.io.checkpoint import read_manifest
    from hardener.training.record import TrainingRecord

    x, y = _data()
    patched = hardener.patch(trained_tiny(), (x, y), recipe="transfer", epochs=1, steps=1, batch_size=32,
                             progress=False)
    rec = patched.training_record
    assert isinstance(rec, TrainingRecord) and rec.threat_model == "transfer" and rec.preset["name"] == "transfer"
    assert rec["config"] == rec.config and "teacher" not in rec.to_dict() and rec.split is not None
    patched.save(tmp_path / "p.safetensors", arch=ARCH)
    assert read_manifest(tmp_path / "p.safetensors").training == json.loads(json.dumps(rec.to_dict()))


def test_library_patch_resumes_an_interrupted_run(tmp_path):
    """`hardener.patch(..., state=F)`: an interrupt (SIGINT, as Ctrl-C in a notebook) stops at the next step, saves
    the training's state and raises `Interrupted` in the library's words; `resume=True` continues to the same
    patches as an uninterrupted run, bit for bit, and the state file goes once `patch` returns."""
    import os
    import signal

    from hardener.errors import Interrupted

    net = trained_tiny()
    kw = dict(**FAST, seed=3)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    whole = hardener.patch(net, _data(), progress=False, **kw)
    state = tmp_path / "run.partial"

    def interrupt(phase, done, total, info):
        if phase == "train" and done == 3:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted, match=r"interrupted at epoch \d+, step \d+: state saved to '.*run.partial'; rerun "
                                          r"with resume=True"):
        hardener.patch(net, _data(), progress=interrupt, state=state, **kw)
    assert state.exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    with pytest.raises(InputError, match="holds an interrupted training run: pass resume=True"):
        hardener.patch(net, _data(), progress=False, state=state, **kw)
    with pytest.raises(InputError, match="resume=True: the settings differ"):
        hardener.patch(net, _data(), progress=False, state=state, resume=True, **{**kw, "seed": 4})
    done = hardener.patch(net, _data(), progress=False, state=state, resume=True, **kw)
    mine, ref = done.patches.state_dict(), whole.patches.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert not state.exists()
    with pytest.raises(InputError, match="^resume=True needs state="):
        hardener.patch(net, _data(), progress=False, resume=True, **kw)
    with pytest.raises(InputError, match="does not exist"):
        hardener.patch(net, _data(), progress=False, state=tmp_path / "no" / "run.partial", **kw)
    with pytest.raises(InputError, match="is a folder: give a file"):
        hardener.patch(net, _data(), progress=False, state=tmp_path, **kw)


def test_library_evaluate_resumes_an_interrupted_run(tmp_path):
    """`hardener.evaluate(..., state_dir=D)`: an interrupt keeps the finished attacks and batches and says how to go
    on; `resume=True` finishes from there with the uninterrupted run's figures; the state goes with the report."""
    from hardener.errors import Interrupted

    patched = _quick_patch(trained_tiny(), progress=False)
    x, y = _data(60, seed=9)
    kw = dict(attacks="apgd-ce,apgd-dlr", steps=3, batch_size=16, eps=0.1)
    calls = []
    whole = hardener.evaluate(patched, (x, y), progress=lambda *a: calls.append(a[:3]), **kw)
    first = ("base whitebox apgd-ce", 60, 60)
    assert first in calls and ("patched whitebox apgd-ce", 32, 60) in calls
    seen = []

    def stop_in_the_patched_models_first_attack(*a):
        seen.append(a[:3])
        if a[:3] == ("patched whitebox apgd-ce", 32, 60):  # the base's attacks done, two batches of this one
            raise KeyboardInterrupt
    state = tmp_path / "state"
    with pytest.raises(Interrupted, match=r"^interrupted: progress saved to '.*'; call again with resume=True"):
        hardener.evaluate(patched, (x, y), progress=stop_in_the_patched_models_first_attack, state_dir=state, **kw)
    assert len(list(state.glob(".harden-eval-*.partial"))) == 1
    with pytest.raises(InputError, match="holds an interrupted evaluation: pass resume=True"):
        hardener.evaluate(patched, (x, y), progress=False, state_dir=state, **kw)
    again = []
    done = hardener.evaluate(patched, (x, y), progress=lambda *a: again.append(a[:3]), state_dir=state, resume=True,
                             **kw)
    assert done.summary == whole.summary and done.robust == whole.robust
    assert not any(c[0].startswith("base") and c[1] < c[2] for c in again)  # the base's finished attacks not redone
    assert len(again) < len(calls)
    assert not list(state.glob(".harden-eval-*.partial"))
    with pytest.raises(InputError, match="^resume=True needs state_dir="):
        hardener.evaluate(patched, (x, y), progress=False, resume=True, **kw)
    with pytest.raises(KeyboardInterrupt):  # nothing kept: Python's own interrupt
        hardener.evaluate(patched, (x, y), progress=stop_in_the_patched_models_first_attack, **kw)


def test_noise_sigma_takes_a_fraction_in_the_library_as_on_the_command_line():
    from hardener.options.patch_options import PatchOptions

    opts, _ = PatchOptions.build("certify", {"noise_sigma": "64/255"})
    assert opts.noise_sigma == 64 / 255
    with pytest.raises(InputError, match="^noise_sigma must be a number or a fraction like 64/255"):
        PatchOptions.build("certify", {"noise_sigma": "lots"})
