"""Issue 16: the standard AutoAttack against the reference code, adaptive attacks on our own patches, provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hardener
from hardener.cli.app import main
from hardener.evaluation import threats as E
from hardener.model.classifier import Classifier, InputSpec
from hardener.patches import PatchedModel

import tiny_model
from conftest import HERE, assert_input_error

# ---------------------------------------------------------------- a masked defence: a quantising pre-filter


class Quantise(nn.Module):
    """A pre-filter that rounds its input to steps of 1/50: the forward keeps the class, the gradient is zero
    everywhere (the shattered-gradients defence BPDA was made for). Registered as a pre-filter that may mask."""
    kind = "prefilter"
    input_only = True
    may_mask = True

    def __init__(self) -> None:
        super().__init__()
        self.strength = 1.0

    def extra_spec(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 50) / 50


def _boundary(n: int = 40, margin: float = 0.04) -> tuple[torch.Tensor, torch.Tensor]:
    """Fragile's 2-class data: mean pixel 0.25 ± margin (on the grid of Quantise), half of each class."""
    y = torch.arange(n) % 2
    x = torch.full((n, 1, 4, 4), 0.25) + torch.where(y == 1, margin, -margin).view(n, 1, 1, 1)
    return x, y


def _quantised() -> PatchedModel:
    p = PatchedModel(Classifier(tiny_model.fragile(), InputSpec(shape=[1, 4, 4])))
    p.attach("input", Quantise())
    return p


def _evaluate(patched, x, y, threats, surrogate=None, attacks=("apgd-ce",), checks=False):
    cfg = E.EvalConfig(attacks=list(attacks), eps=0.1, steps=20, threats=threats, checks=checks, batch_size=64)
    ds = hardener.as_dataset((x, y))
    return E.evaluate(patched, ds, cfg, torch.device("cpu"), has_patches=True, surrogate=surrogate)


def test_bpda_breaks_a_quantising_prefilter_that_plain_apgd_cannot():
    x, y = _boundary()
    res = _evaluate(_quantised(), x, y, ("whitebox", "adaptive"), checks=True)
    m = res.models["patched"]
    assert m.clean["accuracy"] == 1.0
    # zero gradients: APGD's steps go nowhere, only its random start could cross a 0.04 margin (2.8 sigma)
    assert m.threats["whitebox"].robust["accuracy"] >= 0.9
    # BPDA (identity backward through the quantiser) sees the linear model's gradient and breaks every sample
    assert m.threats["adaptive"].robust["accuracy"] == 0.0
    assert m.worst_whitebox["accuracy"] == 0.0 and m.worst_case["accuracy"] == 0.0
    check = {c["name"]: c for c in res.checks}["bpda_not_stronger_than_whitebox"]
    assert check["status"] == "warn" and "of the samples the white-box attacks left" in check["detail"]
    # the base (no patches) has no BPDA chain: nothing there could mask gradients
    assert "adaptive" not in res.models["base"].threats


def test_straight_through_keeps_the_forward_exact():
    x, _ = _boundary()
    p = _quantised()
    with torch.no_grad():
        exact = p(x)
    st = E.StraightThrough(p)
    xg = x.clone().requires_grad_(True)
    out = st(xg)
    assert torch.equal(out.detach(), exact)
    out[:, 1].sum().backward()
    assert xg.grad.abs().sum() > 0  # the quantiser's zero Jacobian replaced by the identity
    xg2 = x.clone().requires_grad_(True)
    p(xg2)[:, 1].sum().backward()
    assert xg2.grad.abs().sum() == 0


def test_no_maskable_patch_no_bpda_chain_and_it_says_so():
    x, y = _boundary()
    p = PatchedModel(Classifier(tiny_model.fragile(), InputSpec(shape=[1, 4, 4])))

    class Shift(nn.Module):  # a smooth pre-filter that does not declare may_mask
        kind, input_only = "prefilter", True

        def __init__(self):
            super().__init__()
            self.strength = 1.0

        def extra_spec(self):
            return {}

        def forward(self, v):
            return v + 0.0

    p.attach("input", Shift())
    res = _evaluate(p, x, y, ("whitebox", "adaptive"))
    m = res.models["patched"]
    assert "adaptive" not in m.threats and "could mask gradients" in m.threats_skipped["adaptive"]


def test_surrogate_transfer_and_provenance_sum_to_the_worst_case():
    x, y = _boundary()
    res = _evaluate(_quantised(), x, y, E.THREATS, surrogate=tiny_model.fragile().eval())
    m = res.models["patched"]
    assert m.threats["surrogate"].robust["accuracy"] == 0.0  # the bare linear model's examples transfer
    counts, per_sample = m.broken_by, m.per_sample_broken_by
    broken = sum(v for k, v in counts.items() if k not in ("robust", "clean_error"))
    assert broken == m.clean["correct"] - m.worst_case["correct"]
    assert counts.get("robust", 0) == m.worst_case["correct"]
    assert len(per_sample) == len(y) and sum(v is None for v in per_sample) == m.worst_case["correct"]
    # first breaker in the order whitebox, adaptive, surrogate, ...: BPDA comes before the surrogate
    assert all(k.split("/")[0] in E.THREATS for k in counts if k not in ("robust", "clean_error"))
    assert counts.get("adaptive/apgd-ce", 0) >= 36


def test_cli_surrogate_threat_needs_a_surrogate(runner, tmp_path):
    x, y = _boundary()
    f = tmp_path / "b.npz"
    np.savez(f, images=x.numpy(), labels=y.numpy())
    ck = tmp_path / "m.safetensors"
    from safetensors.torch import save_file
    save_file(tiny_model.fragile().state_dict(), str(ck))
    r = runner.invoke(main, ["eval", str(ck), "--arch", f"{HERE / 'tiny_model.py'}:fragile", "--data", str(f),
                             "--threat", "whitebox,surrogate", "--quiet"])
    assert_input_error(r, "--surrogate")


def test_cli_surrogate_runs_and_is_recorded(runner, tmp_path):
    """A patched checkpoint of Tiny evaluated with --surrogate: the surrogate chain, its sha256, the RobustBench
    entry and the provenance are in the JSON."""
    from safetensors.torch import save_file

    import tiny_model as T
    from conftest import FAST_PATCH

    torch.manual_seed(0)
    net = T.tiny()
    ck = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ck))
    xs = torch.rand(120, 1, 8, 8)
    ys = (xs.mean((1, 2, 3)) * 30).long() % 3
    data = tmp_path / "d.npz"
    np.savez(data, images=xs.numpy(), labels=ys.numpy())
    arch = f"{HERE / 'tiny_model.py'}:tiny"
    out = tmp_path / "p.safetensors"
    low = "--allow-low-accuracy"  # an untrained Tiny on labels of mean brightness: near chance
    r = runner.invoke(main, ["patch", str(ck), "--arch", arch, "--data", str(data), "--at", "prefilter:input",
                             "--width", "4", "--out", str(out), low, *FAST_PATCH])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(out), "--arch", arch, "--data", str(data), "--surrogate", str(ck),
                             "--eps", "0.1", "--steps", "3", "--max-samples", "40", "--threat",
                             "whitebox,adaptive,surrogate", "--no-checks", "--json", "--quiet", low])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    m = rep["models"]["patched"]
    assert {"whitebox", "adaptive", "surrogate"} <= set(m["threats"])
    assert rep["surrogate"]["sha256"] and rep["summary"]["adaptive"] is not None
    assert rep["robustbench"]["clean_acc"] == round(100 * m["clean"]["accuracy"], 2)
    assert rep["robustbench"]["autoattack_acc"] is None  # not the standard suite
    assert sum(v for k, v in m["broken_by"].items() if k not in ("robust", "clean_error")) == \
        m["clean"]["correct"] - m["worst_case"]["correct"]


# ---------------------------------------------------------------- the standard AutoAttack vs the reference code


def _prototype_model(n_classes: int = 10, dim: int = 16, seed: int = 0):
    """A nearest-prototype linear classifier on 1x4x4 images in [0.2, 0.8]: its exact Linf robustness is known in
    closed form (no [0, 1] box constraint binds for eps <= 0.15), so an attack's per-sample answer can be checked."""
    g = torch.Generator().manual_seed(seed)
    protos = 0.3 + 0.4 * torch.rand(n_classes, dim, generator=g)
    lin = nn.Linear(dim, n_classes)
    with torch.no_grad():
        lin.weight.copy_(protos * 20)
        lin.bias.copy_(-(protos ** 2).sum(1) * 10)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    y = torch.arange(200) % n_classes
    x = (protos[y] + 0.06 * torch.randn(200, dim, generator=g)).clamp(0.2, 0.8).view(200, 1, 4, 4)
    return model, lin, x, y


def _exact_distance(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The smallest Linf perturbation that changes the linear model's decision (0 if already wrong)."""
    w, b = lin.weight.detach(), lin.bias.detach()
    xf = x.flatten(1)
    dw = w[y][:, None, :] - w[None, :, :]  # N, C, D
    margin = (dw * xf[:, None, :]).sum(-1) + (b[y][:, None] - b[None, :])
    d = margin / dw.abs().sum(-1).clamp_min(1e-12)
    d[torch.arange(len(y)), y] = float("inf")
    return d.min(1).values.clamp_min(0)


def test_standard_autoattack_agrees_with_the_reference_implementation():
    pyautoattack = pytest.importorskip("pyautoattack")
    model, lin, x, y = _prototype_model()
    dist = _exact_distance(lin, x, y)
    correct = model(x).argmax(1) == y
    eps = float(dist[correct].median())
    exact = dist > eps  # robust in closed form
    assert 0.3 < float(exact.float().mean()) < 0.7

    rep = hardener.evaluate(model, (x, y), "autoattack", eps=eps, threat="whitebox,blackbox", checks=False,
                            device="cpu")
    ours = torch.tensor([b is None for b in rep.data["models"]["base"]["per_sample_broken_by"]])
    assert rep.data["robustbench"]["autoattack_acc"] == round(100 * float(ours.float().mean()), 2)

    aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    aa.verbose = False
    adv = aa.run_standard_evaluation(x, y, batch_size=200)
    adv = adv[0] if isinstance(adv, tuple) else adv  # (x_adv, y_adv) in this release
    with torch.no_grad():
        ref = model(adv).argmax(1) == y
    n = len(y)
    # both are exact on a linear model up to the attacks' randomness: per-sample agreement and the 95% interval
    assert int((ours != ref).sum()) <= 0.03 * n
    lo, hi = E.wilson(int(ref.sum()), n)
    assert lo <= float(ours.float().mean()) <= hi
    assert int((ours != exact).sum()) <= 0.03 * n and int((ref != exact).sum()) <= 0.03 * n


# ---------------------------------------------------------------- the shipped JSON Schema


def test_eval_and_patch_reports_validate_against_the_shipped_schema(runner, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from safetensors.torch import save_file

    from hardener.reports import report as R

    from conftest import FAST_PATCH

    schema = json.loads(R.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    torch.manual_seed(0)
    ck = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.tiny().state_dict().items()}, str(ck))
    xs = torch.rand(120, 1, 8, 8)
    data = tmp_path / "d.npz"
    np.savez(data, images=xs.numpy(), labels=((xs.mean((1, 2, 3)) * 30).long() % 3).numpy())
    arch = f"{HERE / 'tiny_model.py'}:tiny"
    out, prep, erep = tmp_path / "p.safetensors", tmp_path / "patch.json", tmp_path / "eval.json"
    low = "--allow-low-accuracy"  # an untrained Tiny on labels of mean brightness: near chance
    r = runner.invoke(main, ["patch", str(ck), "--arch", arch, "--data", str(data), "--at", "prefilter:input,auto",
                             "--width", "4", "--out", str(out), "--report", str(prep), low, *FAST_PATCH])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["eval", str(out), "--arch", arch, "--data", str(data), "--eps", "0.1", "--steps", "2",
                             "--attack", "apgd-ce,square", "--queries", "20", "--max-samples", "30", "--quiet",
                             "--report", str(erep), "--fail-under", "clean=0.1", low])
    assert r.exit_code in (0, 1), r.output
    reports = {"patch": json.loads(prep.read_text()), "eval": json.loads(erep.read_text())}
    for kind, rep in reports.items():
        assert rep["schema"] == f"harden.{kind}-report/3"
        errors = sorted(validator.iter_errors(rep), key=lambda e: list(e.path))
        assert not errors, f"{kind}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
        assert R.validate(rep) == []
    # a report that breaks the schema is caught (the test can fail)
    bad = json.loads(erep.read_text())
    bad["models"]["patched"]["clean"]["accuracy"] = 1.5
    assert list(validator.iter_errors(bad))
    bad = json.loads(erep.read_text())
    bad["schema"] = "harden.patch-report/3"
    assert list(validator.iter_errors(bad))


def test_suite_versions_follow_the_reference_settings():
    from hardener import attacks as A

    model, lin, x, y = _prototype_model()
    rep = hardener.evaluate(model, (x[:20], y[:20]), "autoattack-plus", eps=0.02, steps=2, threat="whitebox",
                            checks=False, device="cpu")
    settings = {s["name"]: s for s in rep.data["attack_settings"]}
    assert [r["attack"] for r in rep.data["models"]["base"]["threats"]["whitebox"]["attacks"]] == \
        ["apgd-ce", "apgd-dlr", "fab", "apgd-t", "fab-t"]
    assert settings["apgd-ce"]["restarts"] == 5 and settings["fab"]["restarts"] == 5
    assert settings["apgd-t"]["restarts"] == 1 and settings["apgd-t"]["n_target_classes"] == 9
    assert "eot" not in settings["apgd-ce"]
    rand = hardener.evaluate(model, (x[:10], y[:10]), "autoattack-rand", eps=0.02, steps=2, threat="whitebox",
                             checks=False, device="cpu")
    assert {s["name"]: s.get("eot") for s in rand.data["attack_settings"]} == {"apgd-ce": 20, "apgd-dlr": 20}
    assert A.SUITES["autoattack"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_cli_suite_option(runner, tmp_path):
    model, lin, x, y = _prototype_model()
    from safetensors.torch import save_file
    f = tmp_path / "d.npz"
    np.savez(f, images=x[:20].numpy(), labels=y[:20].numpy())
    ck = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
    arch = tmp_path / "proto.py"
    arch.write_text("import torch\nfrom torch import nn\n\ndef proto():\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10))\n")
    r = runner.invoke(main, ["eval", str(ck), "--arch", f"{arch}:proto", "--data", str(f), "--suite", "standard",
                             "--eps", "0.02", "--steps", "2", "--queries", "10", "--no-checks", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["summary_context"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # the standard suite's names with other budgets is not the standard AutoAttack: no autoattack_acc, and why
    assert rep["robustbench"]["autoattack_acc"] is None
    assert "2 steps, not 100" in rep["robustbench"]["autoattack_acc_missing"]
