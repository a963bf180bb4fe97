"""harden eval on models with known answers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hardener import attacks as A
from hardener import data as hdata
from hardener.cli.app import main
from hardener.evaluation import threats as E
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import PatchedModel
from hardener.patches.attach import Disabled
from hardener.reports import report as R

import tiny_model
from conftest import ARCH, HERE, assert_input_error


def _save(tmp_path, model, name):
    f = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(f))
    return f


@pytest.fixture()
def boundary_data(tmp_path):
    """2-class 1x4x4 images within 0.01 of the Fragile model's boundary (mean pixel 0.25), all correct."""
    n = 40
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 4, 4), 0.25) + torch.where(labels == 1, 0.01, -0.01).view(n, 1, 1, 1)
    f = tmp_path / "boundary.npz"
    np.savez(f, images=x.numpy().astype(np.float32), labels=labels.numpy())
    return f


@pytest.fixture()
def rounding_data(tmp_path):
    """Class 0, pixels at 0.42: round() gives 0; +0.1 on half the pixels flips the rounded sum.

    A random start rarely gets there (each pixel needs +0.08 of its ±0.1); Square does, gradients never.
    """
    n = 20
    x = torch.full((n, 1, 4, 4), 0.42)
    f = tmp_path / "round.npz"
    np.savez(f, images=x.numpy().astype(np.float32), labels=np.zeros(n, dtype=np.int64))
    return f


def test_model_any_attack_breaks_has_zero_robust_accuracy(runner, tmp_path, boundary_data):
    ckpt = _save(tmp_path, tiny_model.fragile(), "fragile")
    r = runner.invoke(main, ["eval", str(ckpt), "--arch", f"{HERE / 'tiny_model.py'}:fragile", "--data",
                             str(boundary_data), "--attack", "fgsm,pgd,apgd", "--eps", "0.1", "--steps", "10",
                             "--json", "--quiet", "--no-checks"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    base = rep["models"]["base"]
    assert base["clean"]["accuracy"] == 1.0
    assert base["worst_case"]["accuracy"] == 0.0
    assert base["threats"]["whitebox"]["robust"]["accuracy"] == 0.0
    assert base["threats"]["whitebox"]["attacks"][0]["attack"] == "pgd"  # iterative first, FGSM after


def test_zero_gradient_model_fires_masking_warnings(runner, tmp_path, rounding_data):
    ckpt = _save(tmp_path, tiny_model.rounding(), "round")
    r = runner.invoke(main, ["eval", str(ckpt), "--arch", f"{HERE / 'tiny_model.py'}:rounding", "--data",
                             str(rounding_data), "--attack", "apgd,square", "--eps", "0.1", "--steps", "5",
                             "--queries", "200", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["nonzero_gradients"]["status"] == "warn"
    assert checks["square_not_stronger_than_whitebox"]["status"] == "warn"
    # what was seen and how sure: counts and an interval, never a bare verdict
    for name in ("nonzero_gradients", "square_not_stronger_than_whitebox"):
        assert re.search(r"\d+ of \d+ \([\d.]+%, 95% CI [\d.]+%-[\d.]+%\)", checks[name]["detail"]), checks[name]
        assert "are masked" not in checks[name].get("hint", "")
    base = rep["models"]["base"]
    assert base["threats"]["whitebox"]["robust"]["accuracy"] == 1.0  # gradients stall APGD
    assert base["threats"]["blackbox"]["robust"]["accuracy"] < 0.5  # Square is not fooled
    assert base["worst_case"]["accuracy"] == base["threats"]["blackbox"]["robust"]["accuracy"]


def test_worst_case_equals_per_sample_minimum_by_hand(tiny_ckpt):
    from conftest import make_data, tiny_with_a_fixer

    p = tiny_with_a_fixer()
    imgs, labels = make_data(n=60, seed=11)
    ds = hdata.Dataset(imgs, labels, source="toy")
    cfg = E.EvalConfig(attacks=["fgsm"], eps=0.15, threats=("whitebox", "transfer"), checks=False, batch_size=7)
    res = E.evaluate(p, ds, cfg, torch.device("cpu"), has_patches=True)
    x, y = hdata.to_float(imgs), labels
    with torch.no_grad():
        clean = p(x).argmax(1) == y
    wb = A.build(p, A.AttackSpec("fgsm", eps=0.15))(x, y)
    tr = A.build(Disabled(p), A.AttackSpec("fgsm", eps=0.15))(x, y)
    with torch.no_grad():
        by_hand = clean & (p(wb).argmax(1) == y) & (p(tr).argmax(1) == y)
    got = res.models["patched"]
    assert got.worst_case["correct"] == int(by_hand.sum())
    assert torch.equal(got.worst_mask, by_hand)
    assert 0 < int(by_hand.sum()) < int(clean.sum())  # the case is not trivial


def test_perturbation_outside_eps_is_caught(monkeypatch):
    from conftest import make_data, trained_tiny

    def cheat(model, spec):
        return lambda x, y: (x + 3 * spec.eps).clamp(0, 1)  # ignores the budget
    monkeypatch.setitem(A.REGISTRY, "cheat", A.AttackInfo("cheat", cheat, "gradient", 10))
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    imgs, labels = make_data(n=30, seed=5)
    cfg = E.EvalConfig(attacks=["cheat"], eps=0.05, threats=("whitebox",), check_samples=10)
    cfg.attacks = ["cheat"]
    res = E.evaluate(p, hdata.Dataset(imgs, labels), cfg, torch.device("cpu"), has_patches=False)
    checks = {c["name"]: c for c in res.checks}
    assert checks["perturbations_within_eps"]["status"] == "warn"
    assert res.models["base"].threats["whitebox"].eps_violations > 0


def test_wilson_interval():
    lo, hi = E.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert E.wilson(0, 10)[0] == 0.0


def _eval(runner, ckpt, data, *args):
    weak = ["--allow-weak-gate"] if "--fail-under" in args else []  # FGSM gates: see the test below
    return runner.invoke(main, ["eval", str(ckpt), "--arch", ARCH, "--data", str(data), "--attack", "fgsm",
                                "--eps", "0.15", "--quiet", "--no-checks", *weak, *args])


def test_a_gate_on_a_weak_attack_is_an_input_error(runner, patched_ckpt, tiny_test_data):
    fgsm = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm", "--eps",
            "0.15", "--quiet", "--no-checks"]
    weak = runner.invoke(main, [*fgsm, "--fail-under", "robust=0.30", "--threat", "whitebox"])
    assert_input_error(weak, "--fail-under robust=", "iterative", "--allow-weak-gate")
    assert_input_error(runner.invoke(main, [*fgsm, "--fail-under", "transfer=0.1"]), "transfer")
    strong = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                                  "apgd-ce", "--steps", "3", "--eps", "0.15", "--quiet", "--no-checks", "--threat",
                                  "whitebox", "--fail-under", "robust=0.0"])
    assert strong.exit_code == 0, strong.output
    wrong_threat = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data),
                                        "--attack", "apgd-ce", "--steps", "3", "--eps", "0.15", "--quiet",
                                        "--no-checks",
                                        "--threat", "transfer", "--fail-under", "robust=0.0"])
    assert_input_error(wrong_threat, "whitebox")


def test_fail_under_exit_codes(runner, patched_ckpt, tiny_test_data):
    ok = _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", "clean=0.0,robust=0.0,transfer=0.0")
    assert ok.exit_code == 0, ok.output
    m = json.loads(_eval(runner, patched_ckpt, tiny_test_data, "--json").stdout)["models"]["patched"]
    robust = m["worst_whitebox"]["accuracy"]
    assert 0 < robust < 1
    bad = _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", f"clean=0.5,robust={robust + 0.001:.4f}")
    assert bad.exit_code == 1 and "robust accuracy" in bad.output and "clean" not in bad.output.split("missed")[-1]
    at = _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", f"robust={int(1e6 * robust) / 1e4}%")
    assert at.exit_code == 0, at.output
    assert _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", "clean=85").exit_code == 2
    assert _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", "speed=0.3").exit_code == 2
    missing = _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", "blackbox=0.1")
    assert missing.exit_code == 1 and "not measured" in missing.output


def test_json_report_validates_and_other_formats(runner, tmp_path, patched_ckpt, tiny_test_data):
    md, html = tmp_path / "r.md", tmp_path / "r.html"
    r = _eval(runner, patched_ckpt, tiny_test_data, "--json", "--report", str(md), "--report", str(html),
              "--eps-sweep", "0,0.05,0.2")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    assert R.validate(rep) == []
    assert set(rep["models"]) == {"base", "patched"}
    assert set(rep["models"]["patched"]["threats"]) == {"whitebox", "transfer"}
    assert rep["data"]["n"] == 45
    assert "transfer" in md.read_text() and "<svg" in html.read_text()
    broken = dict(rep)
    broken.pop("models")
    assert R.validate(broken)


def test_eval_reads_model_and_data_from_config(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    (tmp_path / "harden.toml").write_text(f'model = "{patched_ckpt}"\neval_data = "{tiny_test_data}"\n'
                                          f'arch = "{ARCH}"\n[eval]\neps = "0.05"\n')
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["eval", "--attack", "fgsm", "--quiet", "--no-checks", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["eps"] == 0.05 and rep["checkpoint"] == str(patched_ckpt)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_every_attack_name_runs(norm):
    """Every name of the suite runs through evaluate, its budget recorded, within eps, stdout clean."""
    import contextlib
    import io

    from conftest import make_data, trained_tiny

    p = PatchedModel(Classifier(trained_tiny(num_classes=4), InputSpec(shape=[1, 8, 8])))
    imgs, labels = make_data(n=12, seed=2)
    names = ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "cw", "deepfool", "square"]
    if norm == "Linf":
        names.append("fgsm")
    eps = 0.1 if norm == "Linf" else 0.5
    cfg = E.EvalConfig(attacks=A.expand(names), eps=eps, norm=norm, steps=3, queries=30,
                       threats=("whitebox", "blackbox"), checks=False)
    buf = io.StringIO()
    rng_before = torch.random.get_rng_state()
    with contextlib.redirect_stdout(buf):
        res = E.evaluate(p, hdata.Dataset(imgs, labels), cfg, torch.device("cpu"), has_patches=False)
    assert buf.getvalue() == ""
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # attacks do not reseed the global RNG
    base = res.models["base"]
    ran = [r.attack for t in base.threats.values() for r in t.attacks]
    assert sorted(ran) == sorted(names)
    assert all(t.eps_violations == 0 for t in base.threats.values())
    settings = {r.attack: r.settings for t in base.threats.values() for r in t.attacks}
    assert settings["apgd-t"]["n_target_classes"] == 3 and settings["square"]["queries"] == 30
    assert settings["cw"]["min_norm"] is (norm == "L2")


def test_dlr_attacks_need_enough_classes():
    from hardener.errors import InputError

    with pytest.raises(InputError, match="at least 4 classes"):
        A.AttackSpec("apgd-t", eps=0.1, n_classes=3)


def test_reference_budgets_are_the_defaults():
    assert A.AttackSpec("apgd", eps=0.1).steps == 100
    assert A.AttackSpec("square", eps=0.1).queries == 5000
    assert A.expand(["autoattack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_deterministic_flag_is_recorded(runner, patched_ckpt, tiny_test_data):
    try:
        r = _eval(runner, patched_ckpt, tiny_test_data, "--deterministic", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["environment"]["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)
    r = _eval(runner, patched_ckpt, tiny_test_data, "--json")
    assert json.loads(r.stdout)["environment"]["deterministic"] is False


def test_report_has_a_flat_summary_and_a_headline(runner, tmp_path, patched_ckpt, tiny_test_data):
    md, html = tmp_path / "r.md", tmp_path / "r.html"
    r = _eval(runner, patched_ckpt, tiny_test_data, "--json", "--fail-under", "clean=0.1", "--report", str(md),
              "--report", str(html))
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    s = rep["summary"]
    assert all(not isinstance(v, dict) for v in s.values())  # flat, for MLflow / W&B
    m = rep["models"]["patched"]
    assert s["clean"] == round(m["clean"]["accuracy"], 4) and s["robust"] == round(m["worst_whitebox"]["accuracy"], 4)
    assert s["delta_clean"] == round(m["clean"]["accuracy"] - rep["models"]["base"]["clean"]["accuracy"], 4)
    assert s["gates_passed"] == 1 and s["eps"] == 0.15
    import hashlib

    assert rep["checkpoint_sha256"] == hashlib.sha256(patched_ckpt.read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rep["created"])
    head = md.read_text().splitlines()[2:8]
    assert head[0].startswith(f"Model `{patched_ckpt.name}` (sha256 `{rep['checkpoint_sha256'][:16]}")
    assert "white-box" in head[1] and "points against the base" in head[2] and "Gates: **passed**" in head[3]
    assert head[4].startswith("**Reduced budget**") and head[5].startswith("Inference cost: ")  # measured here
    assert "<div class=headline>" in html.read_text() and "<b>patched</b>" in html.read_text()
    assert "| class | n | clean | worst case |" in md.read_text() and "<h2>Per class</h2>" in html.read_text()
    pc = rep["models"]["patched"]["per_class"]
    assert all(v == round(v, 4) for r in pc for v in (r["clean"], r["worst_case"]))  # no float noise


class _Picky(torch.nn.Module):
    """Raises out-of-memory above a batch size, like a GPU that is too small."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: batch {x.shape[0]} > {self.limit}")
        return self.net(x)


def test_out_of_memory_halves_the_batch_and_finishes(capsys):
    from conftest import make_data, trained_tiny

    net = trained_tiny()
    imgs, labels = make_data(n=40, seed=5)
    ds = hdata.Dataset(imgs, labels)
    cfg = dict(attacks=["pgd", "fgsm"], eps=0.1, steps=3, threats=("whitebox",), checks=False)
    ref = E.evaluate(PatchedModel(Classifier(net, InputSpec(shape=[1, 8, 8]))), ds,
                     E.EvalConfig(**cfg, batch_size=8), torch.device("cpu"), has_patches=False)
    picky = PatchedModel(Classifier(_Picky(net, 8), InputSpec(shape=[1, 8, 8])))
    got = E.evaluate(picky, ds, E.EvalConfig(**cfg, batch_size=32), torch.device("cpu"), has_patches=False)
    assert [(o["from"], o["to"]) for o in got.out_of_memory][:2] == [(32, 16), (16, 8)]
    assert "out of memory" in capsys.readouterr().err
    assert got.models["base"].worst_case == ref.models["base"].worst_case
    # the transfer examples of a patched model (computed in fixed batches, shared across models) halve too
    from hardener.patches import Fixer, FixerConfig

    pp = PatchedModel(Classifier(_Picky(net, 8), InputSpec(shape=[1, 8, 8])))
    pp.attach("net.block", Fixer(8, FixerConfig()))
    got = E.evaluate(pp, ds, E.EvalConfig(**{**cfg, "threats": ("whitebox", "transfer")}, batch_size=32),
                     torch.device("cpu"), has_patches=True)
    assert any(o["where"].startswith("transfer examples") for o in got.out_of_memory)
    assert "transfer" in got.models["patched"].threats
    # below the floor: exit 3 with one line
    from hardener.errors import RunError

    with pytest.raises(RunError, match="out of memory .* even at batch size"):
        E.evaluate(PatchedModel(Classifier(_Picky(net, 8), InputSpec(shape=[1, 8, 8]))), ds,
                   E.EvalConfig(**cfg, batch_size=32, min_batch_size=16), torch.device("cpu"), has_patches=False)


def _ramp_attack(cap: int, calls: list):
    """An iterative attack whose reach grows with its steps up to `cap`: FGSM's direction, min(steps, cap)/cap of
    eps. Records (batch size, steps, eps) of every call."""
    def build(model, spec):
        def run(x, y):
            calls.append((len(x), spec.steps, spec.eps))
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y), xg)
            return (x + spec.eps * min(spec.steps, cap) / cap * g.sign()).clamp(0, 1).detach()
        return run
    return build


@pytest.mark.parametrize("cap, eps, status", [(4, 0.15, "pass"), (8, 0.3, "warn")])
def test_convergence_check_doubles_the_steps_on_what_the_chain_left(monkeypatch, cap, eps, status):
    from conftest import make_data, trained_tiny

    calls: list = []
    monkeypatch.setitem(A.REGISTRY, "ramp", A.AttackInfo("ramp", _ramp_attack(cap, calls), "gradient", 4))
    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    imgs, labels = make_data(n=80, seed=3)
    cfg = E.EvalConfig(attacks=["ramp"], eps=eps, steps=4, threats=("whitebox",), check_samples=40, batch_size=16)
    res = E.evaluate(p, hdata.Dataset(imgs, labels), cfg, torch.device("cpu"), has_patches=False)
    checks = {c["name"]: c for c in res.checks}
    conv = checks["converged"]
    # 8 steps of an attack that still gains from them (cap 8) break what 4 left; one that saturates at 4 does not
    assert conv["status"] == status, conv
    assert "8 steps on what it left" in conv["detail"]
    # the check reused the chain's 4-step result: no 4-step rerun, and the 8-step run saw only what the chain left
    chain_calls = sum(n for n, s, e in calls if s == 4 and e == eps)
    assert chain_calls == res.models["base"].threats["whitebox"].attacks[0].attacked
    doubled = sum(n for n, s, e in calls if s == 8)
    assert 0 < doubled < 40
    assert checks["large_eps_near_chance"]["detail"].endswith("(chance 0.33; 40 samples)")


def test_check_sample_count_is_a_bounded_quarter():
    assert [E.check_sample_count(n) for n in (10, 60, 250, 500, 1000, 10_000)] == [10, 50, 62, 125, 200, 200]


# --- progress you can trust -------------------------------------------------------------------------------------------

def test_heartbeat_names_every_phase_of_a_non_tty_eval(runner, monkeypatch, tiny_ckpt, tiny_data):
    """Off a terminal, a line at least every HARDEN_PROGRESS_SECONDS while a phase runs, even when no batch ends in
    that time: a slow attack (each call 6 intervals) leaves the attacks, the sanity checks and the sweep silent
    between callbacks; a heartbeat naming each of them must appear."""
    import time

    def slow(model, spec):
        def run(x, y):
            time.sleep(0.3)
            return x.clone()
        return run
    monkeypatch.setitem(A.REGISTRY, "slow", A.AttackInfo("slow", slow, "gradient", 1))
    monkeypatch.setenv("HARDEN_PROGRESS_SECONDS", "0.05")
    t0 = time.time()
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--attack", "slow",
                             "--eps", "0.1", "--threat", "whitebox", "--eps-sweep", "0,0.1", "--max-samples", "60"])
    assert r.exit_code == 0, r.output
    beats = [line for line in r.output.splitlines() if line.endswith("(heartbeat)")]
    for phase in ("base whitebox slow 0/", "sanity checks 0/1", "sweep eps=0.1 whitebox slow 0/"):
        assert any(line.startswith(phase) for line in beats), (phase, r.output)
    assert time.time() - t0 < 30


def test_heartbeat_between_callbacks_and_one_eta_on_a_terminal(monkeypatch):
    """The heartbeat is ProgressView's (certify's long rows get it too); on a terminal the bar shows one ETA."""
    import io
    import time

    from hardener.runtime import console

    monkeypatch.setenv("HARDEN_PROGRESS_SECONDS", "0.05")
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    with console.ProgressView(quiet=False) as progress:
        progress("certify", 1, 4, {})
        time.sleep(0.3)
    assert "certify 1/4: still running" in buf.getvalue()
    tty = io.StringIO()
    monkeypatch.setattr(console.err_console, "_file", tty)  # not `file`: its getter would save the patched stderr
    monkeypatch.setattr(console.err_console, "_force_terminal", True)
    with console.ProgressView(quiet=False) as progress:
        progress("train", 5, 10, {"epoch": 1, "eta": "1m00s"})
        progress("validation", 1, 2, {"line": "epoch 1/2 validation on 9 images: ..."})
    shown = tty.getvalue()
    train = next(s for s in shown.splitlines() if s.startswith("train"))
    assert train.count("eta") == 1 and "eta 1m00s" in train and "eta=" not in shown, shown
    assert "epoch 1/2 validation on 9 images" in shown


def test_a_passed_gate_prints_its_line_with_thresholds(runner, patched_ckpt, tiny_test_data):
    r = _eval(runner, patched_ckpt, tiny_test_data, "--fail-under", "clean=0.2,transfer=10%")
    assert r.exit_code == 0, r.output
    line = next(s for s in r.output.splitlines() if s.startswith("gates passed"))
    assert re.fullmatch(r"gates passed \(--fail-under\): clean \d+\.\d% >= 20\.0%, transfer \d+\.\d% >= 10\.0%", line)


# --- reports a team lead forwards ----------------------------------------------------------------------------------

def test_report_cards_budgets_metrics_and_a_reproduce_command_that_reproduces(runner, monkeypatch, tmp_path,
                                                                              patched_ckpt, tiny_test_data):
    import shlex

    monkeypatch.chdir(tmp_path)
    args = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "apgd-ce",
            "--steps", "3", "--eps", "0.15", "--quiet", "--no-checks", "--threat", "whitebox,transfer",
            "--fail-under", "clean=0.2,transfer=10%", "--report", "r.json", "--report", "r.md", "--report", "r.html"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    # summary: numbers alone, for mlflow.log_metrics; what they are of beside it in summary_context
    assert rep["summary"] and all(type(v) in (int, float) for v in rep["summary"].values())
    s, ctx = rep["summary"], rep["summary_context"]
    assert ctx["model"] == "patched" and "blackbox" not in s and "blackbox" in rep["threats_not_run"]
    assert s["clean"] == round(rep["models"]["patched"]["clean"]["accuracy"], 4) and s["gates_passed"] == 1
    assert {"model", "norm", "attacks"}.isdisjoint(s) and ctx["attacks"] == ["apgd-ce"]
    # reduced budgets, on the cards they affect: 3 steps of APGD (reference 100) on 45 images
    red = rep["reduced_budgets"]
    assert red["robust"][0] == "apgd-ce 3 steps (reference 100)" and red["robust"][1:] == red["clean"]
    assert red["clean"][0].startswith("only 45 images (clean 95% CI ") and red["transfer"] == red["robust"]
    html_text, md = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert "reduced: apgd-ce 3 steps (reference 100)" in html_text and "**Reduced budget**" in md
    # gate thresholds on the card and in the headline
    assert "clean &gt;= 20.0%, transfer &gt;= 10.0%" in html_text and "Gates: **passed** (clean >= 20.0%, transfer >= 10.0%)" in md
    # the command line and a command that reproduces the run
    inv = rep["invocation"]
    assert inv["command_line"].startswith(f"harden eval {patched_ckpt} ") and "--steps 3" in inv["command_line"]
    assert inv["working_directory"] == str(tmp_path) and f"Reproduce: `cd {tmp_path} && harden eval" in md
    again = tmp_path / "again"
    again.mkdir()
    monkeypatch.chdir(again)
    r2 = runner.invoke(main, shlex.split(inv["reproduce"])[1:])
    assert r2.exit_code == 0, r2.output
    assert json.loads((again / "r.json").read_text())["summary"] == rep["summary"]


def test_quick_patch_report_says_so_in_every_format(runner, tmp_path, tiny_ckpt, tiny_data):
    from conftest import FAST_PATCH

    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                             "--out", str(tmp_path / "o.safetensors"), "--report", str(tmp_path / "r.json"),
                             *FAST_PATCH])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["report_budget"]["verdict"] is False and rep["report_budget"]["note"].startswith("quick check")
    md, page = R.to_markdown(rep), R.to_html(rep)  # what --report r.md / r.html write
    assert md.splitlines()[2].startswith("**Quick check, not a verdict**") and "harden eval" in md.splitlines()[2]
    assert "<title>harden patch — o.safetensors (quick check, not a verdict)</title>" in page
    assert "<b>Quick check, not a verdict</b>" in page
    assert "full_evaluation" not in md and "full_evaluation" not in page  # the key name is not for readers
    assert rep["invocation"]["command_line"].startswith(f"harden patch {tiny_ckpt} ")
