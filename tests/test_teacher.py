"""Robust distillation (issue 30): `--loss rslad --teacher FILE` trains patches on a robust teacher's soft labels
(RSLAD, Zi et al. 2021); the teacher is checked, frozen, recorded and never saved."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as Fn
from safetensors.torch import load_file

import hardener
from hardener import attacks as A
from hardener import data as hdata
from hardener import methods
from hardener.cli.app import main
from hardener.errors import InputError, Interrupted
from hardener.io.checkpoint import Manifest, read_manifest, save_patched, sha256_file
from hardener.io.resume import Saver
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import Fixer, FixerConfig, PatchedModel
from hardener.training import fit as F

from conftest import (
    ARCH,
    FAST_PATCH,
    assert_input_error,
    fresh_fixed,
    make_data,
    trained_tiny,
)

BASE = trained_tiny()
RECORD = {"file": "teacher.safetensors", "sha256": "0" * 64}


def _teacher(base: torch.nn.Module = BASE, seed: int = 1, **spec) -> PatchedModel:
    """A patched copy of `base` whose fixer is random (not the identity): its logits differ from the base's."""
    net = type(base)(num_classes=base.head[-1].out_features)
    net.load_state_dict(base.state_dict())
    p = PatchedModel(Classifier(net.eval(), InputSpec(shape=[1, 8, 8], **spec)))
    torch.manual_seed(seed)
    fixer = Fixer(8, FixerConfig())
    with torch.no_grad():
        for q in fixer.parameters():
            q.normal_(0, 0.3)
    p.attach("block", fixer)
    return p.eval()


class Rolled(torch.nn.Module):
    """A teacher that disagrees with the base: the base's logits moved one class on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).roll(1, dims=1)


def _saved(path, patched: PatchedModel):
    save_patched(path, patched, Manifest(arch=ARCH, arch_kwargs={}, input=patched.model.spec.to_json(),
                                         patches=patched.patch_specs(), base_sha256="0" * 64))
    return path


def test_rslad_loss_is_the_papers_formula():
    """(5/6)·KL(T(x) ‖ S(x_adv)) + (1/6)·KL(T(x) ‖ S(x)), batch mean, temperature 1, no CE; μ/λ add as before."""
    g = torch.Generator().manual_seed(0)
    out_clean, out_adv, t = (torch.randn(6, 4, generator=g) for _ in range(3))
    y = torch.randint(0, 4, (6,), generator=g)
    b = methods.Batch(None, torch.zeros(6, 1), y, torch.zeros(6, 1), out_clean, out_adv, {}, {}, t.clone(), {}, t)
    p = t.softmax(1)

    def kl(student):
        return float((p * (p.log() - student.log_softmax(1))).sum(1).mean())

    want = 5 / 6 * kl(out_adv) + 1 / 6 * kl(out_clean)
    parts = methods.build(F.FitConfig(loss="rslad", teacher=RECORD, mu=0, lam=0)).loss(b)
    assert float(parts["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(parts["ce_adv"]) == pytest.approx(5 / 6 * kl(out_adv), rel=1e-5)
    assert float(parts["loss"]) != pytest.approx(float(Fn.cross_entropy(out_adv, y)), rel=1e-3)
    half = methods.build(F.FitConfig(loss="rslad", teacher=RECORD, teacher_weight=0.5, mu=0, lam=0)).loss(b)
    assert float(half["loss"]) == pytest.approx(0.5 * kl(out_adv) + 0.5 * kl(out_clean), rel=1e-5)
    mu = methods.build(F.FitConfig(loss="rslad", teacher=RECORD, mu=2.0, lam=0)).loss(b)  # + μ · KL(base ‖ S(x))
    assert float(mu["loss"]) == pytest.approx(want + 2 * kl(out_clean), rel=1e-5)  # (the base's logits are t here)


@pytest.mark.parametrize("bad,needle", [(dict(loss="rslad"), "--teacher"), (dict(teacher=RECORD), "--loss rslad"),
                                        (dict(loss="rslad", teacher=RECORD, teacher_weight=0.0), "(0, 1]"),
                                        (dict(loss="rslad", teacher=RECORD, noise_sigma=0.25), "--noise-sigma"),
                                        (dict(loss="rslad", teacher=RECORD, method="advamd"), "does not distil")])
def test_fit_config_refuses_rslad_without_teacher_and_the_reverse(bad, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        F.FitConfig(**bad)


def _fit(cfg: F.FitConfig, teacher, **kw) -> PatchedModel:
    imgs, labels = make_data(n=48, seed=4)
    p = fresh_fixed(BASE)
    F.fit(p, hdata.Dataset(imgs, labels), A.AttackSpec("pgd", eps=0.1, steps=2, n_classes=3), cfg,
          torch.device("cpu"), teacher=teacher, **kw)
    return p


def test_fit_with_teacher_trains_towards_it_and_keeps_base_and_teacher_unchanged():
    teacher = Rolled()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = F.FitConfig(epochs=3, batch_size=16, adversary="patched", loss="rslad", teacher=RECORD, mu=0, lam=0,
                      lr=5e-2)
    plain = _fit(F.FitConfig(epochs=3, batch_size=16, adversary="patched", mu=0, lam=0, lr=5e-2), None)
    p = _fit(cfg, teacher)
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in p.base_state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(q.requires_grad for q in teacher.parameters()) and not teacher.training
    x = hdata.to_float(make_data(n=48, seed=4)[0])
    with torch.no_grad():
        target = teacher(x).softmax(1)
        gap = [float(Fn.kl_div(m(x).log_softmax(1), target, reduction="batchmean")) for m in (p, plain)]
    assert gap[0] < 0.5 * gap[1]  # distilled towards the teacher, unlike the same training without it


def test_resume_with_teacher_is_bit_identical(tmp_path):
    cfg = F.FitConfig(epochs=2, batch_size=16, adversary="patched", loss="rslad", teacher=RECORD)  # 6 steps
    ref = _fit(cfg, _teacher())
    saver = Saver(tmp_path / "run.partial", fingerprint="x")
    calls = {"n": 0}

    def stop():  # after the 4th step, mid-epoch 2
        calls["n"] += 1
        return calls["n"] == 4
    with pytest.raises(Interrupted):
        _fit(cfg, _teacher(), saver=saver, stop=stop)
    p = _fit(cfg, _teacher(), saver=Saver(tmp_path / "run.partial", fingerprint="x", resume=True))
    for k, v in ref.patch_state_dict().items():
        assert torch.equal(p.patch_state_dict()[k], v), k


def test_library_patch_with_a_teacher_file_records_it(tmp_path, caplog):
    path = _saved(tmp_path / "heavy.safetensors", _teacher())
    imgs, labels = make_data(n=90, seed=3)
    caplog.set_level("INFO", logger="hardener")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = hardener.patch(BASE, (imgs, labels), None, method="fixer", at="features", epochs=1, steps=1, eps=0.1,
                            batch_size=32, loss="rslad", teacher=str(path), progress=False, attack="pgd")
    assert st.training_record["teacher"] == {"file": "heavy.safetensors", "sha256": sha256_file(path)}
    assert st.training_record["config"]["teacher_weight"] == pytest.approx(5 / 6)
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in st.base_state_dict().items())
    assert list(st.sites) == ["features"]  # the teacher's patch at block is not the student's
    assert "teacher: heavy.safetensors (loss='rslad'" in caplog.text  # the plan says it, in the library's words
    with pytest.raises(InputError, match="teacher="):
        hardener.patch(BASE, (imgs, labels), None, loss="rslad", progress=False)
    with pytest.raises(InputError, match="teacher=.* another base"):
        hardener.patch(trained_tiny(seed=1), (imgs, labels), None, loss="rslad", teacher=str(path), progress=False)


def _cli(runner, tiny_ckpt, tiny_data, out, *extra):
    return runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "30",
                                "--at", "block", "--adversary", "patched", "--out", str(out), *FAST_PATCH, *extra])


def test_cli_patch_with_teacher_writes_no_teacher_tensor_and_names_it(tmp_path, runner, tiny_ckpt, tiny_data,
                                                                      patched_ckpt):
    out = tmp_path / "light.safetensors"
    r = _cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(patched_ckpt))
    assert r.exit_code == 0, r.output
    training = read_manifest(out).training
    assert training["teacher"] == {"file": patched_ckpt.name, "sha256": sha256_file(patched_ckpt)}
    assert training["config"]["loss"] == "rslad"
    src, got = load_file(str(tiny_ckpt)), load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in src.items())
    assert sorted(k for k in got if k.startswith("harden.")) == sorted(k for k in got if k.startswith("harden.block"))


def test_cli_record_without_teacher_has_no_teacher_fields(patched_ckpt):
    training = read_manifest(patched_ckpt).training
    assert "teacher" not in training and "teacher" not in training["config"]
    assert "teacher_weight" not in training["config"]


def test_cli_teacher_errors_exit_2_with_one_line(tmp_path, runner, tiny_ckpt, tiny_data, patched_ckpt):
    out = tmp_path / "x.safetensors"
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad"), "--loss rslad", "--teacher")
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--teacher", str(patched_ckpt)), "--loss rslad")
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(tmp_path / "no")),
                       "--teacher", "does not exist")
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(tiny_ckpt)),
                       "--teacher", "not a harden-patched checkpoint")
    other = _saved(tmp_path / "other.safetensors", _teacher(trained_tiny(seed=1)))
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(other)),
                       "--teacher", "another base")
    four = _saved(tmp_path / "four.safetensors", _teacher(trained_tiny(num_classes=4), num_classes=4))
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(four)),
                       "--teacher", "4 classes", "has 3")
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--loss", "rslad", "--teacher", str(patched_ckpt),
                            "--teacher-weight", "1.5"), "--teacher-weight", "(0, 1]")
    toml = tmp_path / "harden.toml"  # the config file's key
    toml.write_text(f'[patch]\nteacher = "{tmp_path / "gone.safetensors"}"\n')
    assert_input_error(_cli(runner, tiny_ckpt, tiny_data, out, "--config", str(toml), "--loss", "rslad"),
                       "--teacher", "gone.safetensors", "does not exist")
    assert not out.exists()
