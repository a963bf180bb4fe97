"""Randomized smoothing (issue 19, first part): CERTIFY and PREDICT against closed forms on a linear classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hardener.certification.smoothing import (
    ABSTAIN,
    Smoothed,
    SmoothingConfig,
    certify,
    lower_confidence_bound,
    radius_of,
)
from hardener.errors import InputError


class Linear2(nn.Module):
    """Two classes split by the hyperplane w·x + b = 0 (on flattened 1x2x2 images)."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = torch.tensor(w, dtype=torch.float32), float(b)

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)


def test_linear_radius_is_a_lower_bound_close_to_the_distance():
    """For a linear binary classifier, g's radius is exactly the distance to the hyperplane, |w·x+b|/|w|."""
    w, b = [1.0, -2.0, 0.5, 1.0], -0.3
    model = Linear2(w, b)
    cfg = SmoothingConfig(sigma=0.25, n0=100, n=20_000, alpha=0.001, batch_size=5000, sequential=False)
    sm = Smoothed(model, 2, cfg, torch.device("cpu"))
    wt = torch.tensor(w)
    for i, x in enumerate(torch.tensor([[0.6, 0.1, 0.5, 0.2], [0.1, 0.6, 0.2, 0.3], [0.9, 0.0, 0.9, 0.9]])):
        x = x.view(1, 2, 2)
        true = abs(float(x.flatten() @ wt + b)) / float(wt.norm())
        c, r = sm.certify(x, i)
        assert c == int(float(x.flatten() @ wt + b) > 0)
        assert r <= true + 1e-6, (r, true)  # a certificate never overstates
        if true < 0.5:  # far from the cap the bound is close with N = 20,000
            assert true - r < 0.03, (r, true)


def test_abstains_when_the_top_class_is_a_coin_flip():
    model = Linear2([1.0, 0.0, 0.0, 0.0], -0.5)
    sm = Smoothed(model, 2, SmoothingConfig(sigma=0.5, n0=100, n=2000, sequential=False), torch.device("cpu"))
    x = torch.tensor([0.5, 0.3, 0.3, 0.3]).view(1, 2, 2)  # on the hyperplane: p = 1/2
    assert sm.certify(x, 0) == (ABSTAIN, 0.0)
    assert sm.predict(x, 0) == ABSTAIN


def test_selection_and_estimation_use_independent_noise():
    seen = []

    class Spy(Linear2):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    sm = Smoothed(Spy([1.0, 1.0, 1.0, 1.0], -1.0), 2,
                  SmoothingConfig(sigma=0.25, n0=50, n=50, batch_size=50, sequential=False), torch.device("cpu"))
    x = torch.full((1, 2, 2), 0.5)
    sm.certify(x, 0)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # ART once drew the noise once (PR #1678)
    first = seen[0]
    # seeded: the same sample gets the same noise again, another sample other noise
    seen.clear()
    sm.certify(x, 0)
    sm.certify(x, 1)
    assert len(seen) == 4 and torch.equal(seen[0], first) and not torch.equal(seen[0], seen[2])


def test_certify_rows_summary_and_bounds():
    model = Linear2([1.0, -1.0, 1.0, -1.0], 0.0)
    x = torch.rand(6, 1, 2, 2)
    y = (x.flatten(1) @ torch.tensor([1.0, -1.0, 1.0, -1.0]) > 0).long()
    cfg = SmoothingConfig(sigma=0.25, n0=20, n=500, alpha=0.01, batch_size=250, sequential=False)
    res = certify(model, x, y, cfg, 2, torch.device("cpu"))
    s = res.summary()
    assert s["n"] == 6 and 0 <= s["certified_accuracy"]["0.5"] <= s["certified_accuracy"]["0"] <= 1
    assert s["max_certifiable_radius"] == pytest.approx(radius_of(lower_confidence_bound(500, 500, 0.01), 0.25),
                                                        abs=1e-4)
    assert all(r["radius"] <= s["max_certifiable_radius"] + 1e-4 for r in res.rows)
    assert res.to_tsv().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    # a resumed run keeps finished rows
    again = certify(model, x, y, cfg, 2, torch.device("cpu"), done=res.rows[:3])
    assert [r["radius"] for r in again.rows] == [r["radius"] for r in res.rows]
    with pytest.raises(InputError):
        SmoothingConfig(sigma=0)
    assert lower_confidence_bound(0, 10, 0.01) == 0.0


def test_a_shard_certifies_its_positions_with_the_whole_runs_noise_and_resumes(monkeypatch):
    """A torchrun rank certifies only its positions (`positions`), each with the noise the whole run gives that
    sample, and a resumed rank skips the rows it had."""
    model = Linear2([1.0, -1.0, 1.0, -1.0], 0.0)
    x = torch.rand(8, 1, 2, 2)
    y = (x.flatten(1) @ torch.tensor([1.0, -1.0, 1.0, -1.0]) > 0).long()
    cfg = SmoothingConfig(sigma=0.25, n0=20, n=400, alpha=0.01, batch_size=100)
    whole = {r["idx"]: r for r in certify(model, x, y, cfg, 2, torch.device("cpu")).rows}
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    shard = certify(model, x, y, cfg, 2, torch.device("cpu"), positions=[1, 4, 7])
    assert [strip(r) for r in shard.rows] == [strip(whole[i]) for i in (1, 4, 7)]
    real, calls = Smoothed.certify_row, []

    def counted(self, xi, index):
        calls.append(index)
        return real(self, xi, index)
    monkeypatch.setattr(Smoothed, "certify_row", counted)
    again = certify(model, x, y, cfg, 2, torch.device("cpu"), positions=[1, 4, 7], done=shard.rows[:1])
    assert calls == [4, 7] and [strip(r) for r in again.rows] == [strip(r) for r in shard.rows]


def test_cli_certify_writes_rows_and_report(runner, tmp_path, tiny_ckpt, tiny_test_data):
    import json

    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    tsv, rep = tmp_path / "c.tsv", tmp_path / "c.json"
    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0",
            "20", "--n", "200", "--alpha", "0.01", "--max-samples", "9", "--quiet"]
    r = runner.invoke(main, [*args, "--tsv", str(tsv), "--report", str(rep)])
    assert r.exit_code == 0, r.output
    rows = tsv.read_text().splitlines()  # sequential by default: the TSV adds the noisy forwards each sample took
    assert rows[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tdraws" and len(rows) == 10
    data = json.loads(rep.read_text())
    assert data["schema"] == "harden.certify-report/1" and data["summary"]["N"] == 200
    assert data["summary"]["method"] == "sequential" and data["summary"]["max_radius"] == 0.24  # 2σ
    fixed = tmp_path / "f.tsv"  # --fixed: Cohen et al.'s CERTIFY, locuslab/smoothing's columns, n draws each
    assert runner.invoke(main, [*args, "--fixed", "--tsv", str(fixed)]).exit_code == 0
    assert fixed.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert "certified" in data["threat_model"] and len(data["rows"]) == 9
    md = tmp_path / "c.md"
    assert runner.invoke(main, [*args, "--report", str(md)]).exit_code == 0
    assert "| radius | certified accuracy |" in md.read_text()
    assert_input_error(runner.invoke(main, [*args, "--sigma", "-1"]), "sigma")
    assert_input_error(runner.invoke(main, [*args, "--report", str(rep)]), "--force")


def test_predict_smooth_abstains_or_answers(runner, tiny_ckpt, tiny_test_data):
    import json

    from hardener.cli.app import main

    from conftest import ARCH

    r = runner.invoke(main, ["predict", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--smooth",
                             "0.1", "--smooth-n", "200", "--max-samples", "5", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 5 and all(row["abstained"] == (row.get("class") == "abstain") for row in rows)
    assert all(row["prediction"] in (-1, 0, 1, 2) for row in rows)


def test_denoiser_preset_trains_only_its_prefilter_and_the_base_stays(runner, tmp_path, tiny_ckpt, tiny_data):
    from safetensors.torch import load_file

    import hardener
    from hardener.cli.app import main

    from conftest import ARCH

    out = tmp_path / "den.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--preset", "certify",
                             "--noise-sigma", "0.25", "--epochs", "3", "--batch-size", "32", "--width", "8",
                             "--eval-samples", "10", "--eval-steps", "1", "--eps", "0.1", "--out", str(out),
                             "--quiet"])
    assert r.exit_code == 0, r.output
    m = hardener.load(out, arch=ARCH)
    assert [(p["kind"], p["site"]) for p in m.manifest.patches] == [("prefilter", "input")]
    assert m.manifest.training["config"]["noise_sigma"] == 0.25
    assert m.manifest.training["preset"]["threat_model"] == "certified"
    base, got = load_file(str(tiny_ckpt)), load_file(str(out))
    assert all(torch.equal(base[k], got[k]) for k in base)  # the base is bit-identical
    assert any(k.startswith("harden.") and got[k].abs().sum() > 0 for k in got if k.endswith("conv3.weight"))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        denoised = m(x)
        with m.patches_disabled():
            assert not torch.equal(m(x), denoised)  # the denoiser changes what the base sees


@pytest.mark.parametrize("method", [["--fixed"], ["--sequential", "--max-radius", "0.2"]], ids=["fixed", "sequential"])
def test_cli_certify_resumes_an_interrupted_run(runner, tmp_path, tiny_ckpt, tiny_test_data, monkeypatch, method):
    """Interrupted after 4 samples: state kept, exit 130; --resume certifies the rest and equals an uninterrupted
    run (every sample has its own noise stream), fixed-n or sequential."""
    import json

    from hardener.certification import smoothing as C
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0",
            "20", "--n", "200", "--alpha", "0.01", "--max-samples", "9", "--quiet", "--state-dir",
            str(tmp_path / "st"), *method]
    whole = runner.invoke(main, [*args, "--report", str(tmp_path / "whole.json")])
    assert whole.exit_code == 0, whole.output
    real, calls = C.Smoothed.certify_row, []

    def flaky(self, x, index):
        calls.append(index)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, x, index)
    monkeypatch.setattr(C.Smoothed, "certify_row", flaky)
    rep = tmp_path / "r.json"
    r = runner.invoke(main, [*args, "--report", str(rep)])
    assert r.exit_code == 130 and "--resume" in r.output and not rep.exists()
    assert len(list((tmp_path / "st").glob(".harden-certify-*.partial"))) == 1
    calls.clear()

    def counted(self, x, index):
        calls.append(index)
        return real(self, x, index)
    monkeypatch.setattr(C.Smoothed, "certify_row", counted)
    r = runner.invoke(main, [*args, "--report", str(rep), "--resume"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 5  # only the samples the interrupted run had not certified
    a, b = json.loads((tmp_path / "whole.json").read_text()), json.loads(rep.read_text())
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(a["rows"]) == strip(b["rows"]) and a["summary"]["certified_accuracy"] == b["summary"]["certified_accuracy"]
    assert not list((tmp_path / "st").glob(".harden-certify-*.partial"))
    assert_input_error(runner.invoke(main, [*args, "--report", str(tmp_path / "x.json"), "--resume"]), "--resume")


def test_library_certify_is_the_commands_certification(runner, tmp_path, tiny_ckpt, tiny_test_data, monkeypatch,
                                                        capsys):
    """`hardener.certify` runs what `harden certify` runs (the CLI calls the library's `certify_run`) and gives the
    same rows; it shows progress unless `progress=False`, and its errors name Python parameters."""
    import json

    import hardener
    from hardener.certification import run as CR
    from hardener.cli.app import main
    from hardener.errors import InputError

    from conftest import ARCH

    seen = []
    real = CR.certify_run
    monkeypatch.setattr(CR, "certify_run", lambda *a, **k: seen.append(k) or real(*a, **k))
    rep = tmp_path / "r.json"
    r = runner.invoke(main, ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma",
                             "0.12", "--n0", "20", "--n", "300", "--alpha", "0.01", "--max-samples", "6",
                             "--sequential", "--quiet", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert len(seen) == 1  # the command ran the library's certification
    cli = json.loads(rep.read_text())
    cert = hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, sigma=0.12, n0=20, n=300, alpha=0.01,
                            max_samples=6, batch_size=1000, device="cpu", sequential=True)
    assert len(seen) == 2 and "certify" in capsys.readouterr().err  # progress on stderr by default
    keys = ("idx", "label", "predict", "radius", "draws", "stop")
    assert [{k: row[k] for k in keys} for row in cert.rows] == [{k: row[k] for k in keys} for row in cli["rows"]]
    assert cert.summary["certified_accuracy"] == cli["summary"]["certified_accuracy"]
    for r, (lo, hi) in cert.summary["certified_accuracy_ci95"].items():  # Wilson 95% around each figure
        assert lo <= cert.summary["certified_accuracy"][r] <= hi and hi - lo > 0.1  # 6 samples: wide
    assert cert.to_dict()["checkpoint_sha256"] == cli["checkpoint_sha256"]
    assert "| radius | certified accuracy |" in cert._repr_markdown_() and "Certification(n=6" in repr(cert)
    assert cert.to_tsv().splitlines()[0].endswith("\tdraws")
    quiet = hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, sigma=0.12, n0=20, n=50, max_samples=2,
                             progress=False, device="cpu")
    assert capsys.readouterr().err == ""
    assert quiet.summary["method"] == "sequential"  # the default, as on the command line; sequential=False: fixed n
    with pytest.raises(InputError, match="^max_radius applies to sequential certification"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, sequential=False, max_radius=0.5)
    with pytest.raises(InputError, match="^max_radius must be a finite positive number"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, sequential=True, max_radius=0.0)
    with pytest.raises(InputError, match="^n must be an integer"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, n=0)


def test_a_plain_checkpoint_is_hashed_once(tiny_ckpt, tiny_test_data, monkeypatch, runner):
    """Loading a plain checkpoint hashes it (its record's sha256); the certification's report reuses that digest
    instead of reading the file again, in the library and on the command line."""
    import hardener.api
    import hardener.cli.commands.certify as cmd
    import hardener.io.checkpoint as ck
    from hardener.cli.app import main

    from conftest import ARCH

    hashed = []
    real = ck.sha256_file

    def counting(path):
        hashed.append(str(path))
        return real(path)

    for module in (ck, hardener.api, cmd):
        monkeypatch.setattr(module, "sha256_file", counting)
    cert = hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, sigma=0.12, n0=20, n=50, max_samples=2,
                            progress=False, device="cpu")
    assert hashed == [str(tiny_ckpt)] and cert.to_dict()["checkpoint_sha256"] == real(tiny_ckpt)
    hashed.clear()
    r = runner.invoke(main, ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma",
                             "0.12", "--n0", "20", "--n", "50", "--max-samples", "2", "--quiet", "--force"])
    assert r.exit_code == 0, r.output
    assert hashed == [str(tiny_ckpt)]


def test_cli_certify_takes_a_subset_and_refuses_a_noise_level_beyond_the_pixel_range(runner, tmp_path, tiny_ckpt,
                                                                                      tiny_test_data):
    """`--subset` picks the samples as `harden eval`'s does (a count or a share, seeded and stratified; --max-samples
    wins); a σ above 1 (pixel units: 25 meant for 25/255) and a failure probability outside (0, 1) exit 2 with one
    line, in the command line's words and the library's."""
    import json

    import hardener
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0", "20",
            "--n", "100", "--alpha", "0.01", "--quiet", "--json"]
    for subset, n in (("7", 7), ("20%", 9), ("0.2", 9)):  # the 45 test images
        r = runner.invoke(main, [*args, "--subset", subset])
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["rows"]) == n, subset
    r = runner.invoke(main, [*args, "--subset", "20", "--max-samples", "5"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["rows"]) == 5
    assert_input_error(runner.invoke(main, [*args, "--subset", "abc"]), "--subset")
    assert_input_error(runner.invoke(main, [*args, "--subset", "150%"]), "--subset")
    assert_input_error(runner.invoke(main, [*args, "--sigma", "25"]), "--sigma", "(0, 1]", "25/255")
    assert_input_error(runner.invoke(main, [*args, "--alpha", "0"]), "--alpha must be a number in (0, 1)")
    assert_input_error(runner.invoke(main, [*args, "--alpha", "1.5"]), "--alpha must be a number in (0, 1)")
    assert_input_error(runner.invoke(main, [*args, "--n", "0"]), "--n/--draws")
    for kw, says in (({"sigma": 3.0}, "sigma must be a number in (0, 1]"), ({"alpha": 0.0}, "alpha must be a number")):
        with pytest.raises(InputError, match=r"^" + says.split(" (")[0]):
            hardener.certify(str(tiny_ckpt), str(tiny_test_data), arch=ARCH, progress=False, **kw)
    out = tmp_path / "p.safetensors"
    assert_input_error(runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data),
                                            "--preset", "certify", "--noise-sigma", "2", "--out", str(out)]),
                       "--noise-sigma must be a number in [0, 1]")


def test_cli_certify_resume_under_other_settings_names_the_saved_state(runner, tmp_path, tiny_ckpt, tiny_test_data,
                                                                        monkeypatch):
    """`--resume` with settings no interrupted run was saved under says so, and names the states in the folder saved
    under other settings; an interrupt before the first sample says there is nothing to resume."""
    from hardener.certification import smoothing as C
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0", "20",
            "--alpha", "0.01", "--max-samples", "6", "--quiet", "--state-dir", str(tmp_path / "st")]
    real, calls = C.Smoothed.certify_row, []

    def interrupted_after(k):
        def row(self, x, index):
            calls.append(index)
            if len(calls) > k:
                raise KeyboardInterrupt
            return real(self, x, index)
        return row
    monkeypatch.setattr(C.Smoothed, "certify_row", interrupted_after(0))
    r = runner.invoke(main, [*args, "--n", "200"])
    assert r.exit_code == 130 and "before the first sample" in r.output and "--resume" not in r.output
    assert not list((tmp_path / "st").glob("*.partial"))
    calls.clear()
    monkeypatch.setattr(C.Smoothed, "certify_row", interrupted_after(2))
    assert runner.invoke(main, [*args, "--n", "200"]).exit_code == 130
    saved = [p.name for p in (tmp_path / "st").glob(".harden-certify-*.partial")]
    assert len(saved) == 1
    assert_input_error(runner.invoke(main, [*args, "--n", "300", "--resume"]), "no saved certification",
                       "for these settings", "other settings", saved[0])
    # the same file and settings, another normalisation of its inputs: another run
    assert_input_error(runner.invoke(main, [*args, "--n", "200", "--mean", "0.3", "--std", "0.4", "--resume"]),
                       "no saved certification", "for these settings", saved[0])


def test_an_output_whose_folder_is_a_file_says_so(runner, tmp_path, tiny_ckpt, tiny_test_data):
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    (tmp_path / "notes.txt").write_text("x")
    assert_input_error(runner.invoke(main, ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data),
                                            "--report", str(tmp_path / "notes.txt" / "r.json")]),
                       "is a file, not a folder")


def test_library_certify_odds_and_ends(runner, tmp_path, tiny_ckpt, tiny_test_data):
    """What a notebook meets around `hardener.certify`: progress must be a bool or a callable; σ as a fraction;
    numpy arrays as data; the summary's `stops` in both methods; `.save` by suffix; an `n` that can certify nothing
    is an error and one too small for `max_radius` a warning, on the command line too."""
    import json

    import hardener
    from hardener import data as hdata
    from hardener.cli.app import main

    from conftest import ARCH, assert_input_error

    common = dict(arch=ARCH, n0=20, n=300, alpha=0.01, max_samples=4, device="cpu", progress=False)
    with pytest.raises(InputError, match="^progress must be True, False or a callable"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), **{**common, "progress": "yes"})
    frac = hardener.certify(str(tiny_ckpt), str(tiny_test_data), sigma="32/255", max_radius=0.2, **common)
    same = hardener.certify(str(tiny_ckpt), str(tiny_test_data), sigma=32 / 255, max_radius=0.2, **common)
    assert frac.summary["sigma"] == same.summary["sigma"] and frac.rows == [
        {**r, "seconds": f["seconds"]} for r, f in zip(same.rows, frac.rows)]
    with pytest.raises(InputError, match="^sigma must be a number or a fraction like 64/255"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), sigma="a/b", **common)
    ds = hdata.as_dataset(str(tiny_test_data))
    arrays = (hdata.to_float(ds.images).numpy(), ds.labels.numpy())
    import numpy as np

    flipped = hardener.as_dataset((np.flip(arrays[0], -1), arrays[1]))  # negative strides: copied, not refused
    assert torch.equal(hdata.to_float(flipped.images), torch.from_numpy(arrays[0].copy()).flip(-1))
    with pytest.raises(InputError, match="^labels: an array of dtype object torch cannot hold"):
        hardener.as_dataset((arrays[0], np.array(["a"] * len(arrays[1]), dtype=object)))
    fixed = hardener.certify(str(tiny_ckpt), arrays, sigma=32 / 255, sequential=False, **common)
    assert fixed.summary["n"] == 4 and fixed.summary["stops"] == {"fixed": 4}
    assert set(same.summary["stops"]) == {"radius", "abstain", "decided", "reach", "cap"}
    for suffix, check in ((".json", lambda t: json.loads(t)["summary"]["n"] == 4),
                          (".md", lambda t: t.startswith("## harden certify report")),
                          (".tsv", lambda t: len(t.splitlines()) == 5 and t.startswith("idx\tlabel"))):
        fixed.save(tmp_path / f"c{suffix}")
        assert check((tmp_path / f"c{suffix}").read_text()), suffix
    with pytest.raises(InputError, match="saved as .json, .md or .tsv"):
        fixed.save(tmp_path / "c.txt")
    with pytest.raises(InputError,
                       match=r"^n=10 draws cannot certify any radius at alpha=0.001: .* give n=\d+ or more"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), sigma=0.12, **{**common, "n": 10, "alpha": 0.001})
    with pytest.warns(UserWarning, match=r"radius 0.24 \(2σ, the default max_radius\) is beyond what n=300 draws"):
        hardener.certify(str(tiny_ckpt), str(tiny_test_data), sigma=0.12, **common)
    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--n0", "20", "--n", "300",
            "--alpha", "0.01", "--max-samples", "2", "--json"]
    r = runner.invoke(main, [*args, "--sigma", "32/255", "--max-radius", "0.2"])
    assert r.exit_code == 0 and json.loads(r.stdout)["summary"]["sigma"] == 32 / 255 and "warning" not in r.stderr
    r = runner.invoke(main, [*args, "--sigma", "0.12"])
    assert r.exit_code == 0
    assert "warning: radius 0.24 (2σ, the default --max-radius) is beyond what --n 300" in r.stderr
    assert_input_error(runner.invoke(main, [*args, "--sigma", "0.12", "--n", "10", "--alpha", "0.001"]),
                       "--n 10 draws cannot certify any radius")


def test_library_certify_resumes_an_interrupted_run(tmp_path, tiny_ckpt, tiny_test_data):
    """`hardener.certify(..., state_dir=D)`: an interrupt saves the certified samples and says how to go on;
    `resume=True` certifies only the rest, and the rows equal an uninterrupted run's; the state names the model's
    tensors, so another module's run does not pick it up."""
    import hardener
    from hardener.errors import Interrupted

    from conftest import ARCH

    common = dict(sigma=0.12, n0=20, n=300, alpha=0.01, max_radius=0.2, max_samples=6, device="cpu")
    model = hardener.as_patched(str(tiny_ckpt), arch=ARCH)
    whole = hardener.certify(model, str(tiny_test_data), progress=False, **common)
    calls = []

    def stop_at_third(phase, done, total, info):
        calls.append(done)
        if done == 3:
            raise KeyboardInterrupt
    state = tmp_path / "state"
    with pytest.raises(Interrupted, match=r"^interrupted: 3 samples saved to '.*'; call again with resume=True"):
        hardener.certify(model, str(tiny_test_data), progress=stop_at_third, state_dir=state, **common)
    assert len(list(state.glob(".harden-certify-*.partial"))) == 1
    with pytest.raises(InputError, match="holds an interrupted certification: pass resume=True"):
        hardener.certify(model, str(tiny_test_data), progress=False, state_dir=state, **common)
    other = hardener.as_patched(str(tiny_ckpt), arch=ARCH)
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)  # another model, the same settings
    with pytest.raises(InputError, match="no saved certification .* for these settings .* 1 interrupted"):
        hardener.certify(other, str(tiny_test_data), progress=False, state_dir=state, resume=True, **common)
    calls.clear()
    done = hardener.certify(model, str(tiny_test_data), progress=lambda *a: calls.append(a[1]), state_dir=state,
                            resume=True, **common)
    assert calls == [4, 5, 6]  # only the rest was certified
    keys = ("idx", "label", "predict", "radius", "draws", "stop")
    assert [{k: r[k] for k in keys} for r in done.rows] == [{k: r[k] for k in keys} for r in whole.rows]
    assert not list(state.glob(".harden-certify-*.partial"))  # removed once the certification returned
    with pytest.raises(InputError, match=r"^resume=True: no saved certification .*drop resume=True"):
        hardener.certify(model, str(tiny_test_data), progress=False, state_dir=state, resume=True, **common)
    with pytest.raises(InputError, match="^resume=True needs state_dir="):
        hardener.certify(model, str(tiny_test_data), progress=False, resume=True, **common)
    with pytest.raises(KeyboardInterrupt):  # nothing kept: Python's own interrupt
        hardener.certify(model, str(tiny_test_data), progress=stop_at_third, **common)
    other_norm = hardener.as_patched(str(tiny_ckpt), arch=ARCH, mean=[0.3], std=[0.4])  # same tensors, other inputs
    with pytest.raises(Interrupted):
        hardener.certify(model, str(tiny_test_data), progress=stop_at_third, state_dir=state, **common)
    with pytest.raises(InputError, match="no saved certification .* for these settings"):
        hardener.certify(other_norm, str(tiny_test_data), progress=False, state_dir=state, resume=True, **common)
