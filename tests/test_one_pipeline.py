"""One run, two faces (issue 31, item 1, for patch): `harden patch` and `hardener.patch` run the same library code
(`hardener.training.run.patch_run`), and a notebook gets what the command line shows: progress, the plan, the warnings."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.training import run as RUN
from hardener.training.run import FEW_STEPS

from conftest import ARCH, FAST_PATCH, make_data, trained_tiny

FEW = dict(recipe="transfer", at="block", eps=0.1, epochs=1, steps=1, batch_size=32)


def _data():
    imgs, labels = make_data(n=90)
    return imgs.float() / 255, labels


def test_cli_patch_runs_the_library_run(runner, tiny_ckpt, tiny_data, tmp_path, monkeypatch):
    calls = []
    real = RUN.patch_run

    def spy(run, infos):
        calls.append(run)
        return real(run, infos)

    monkeypatch.setattr(RUN, "patch_run", spy)
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "block",
                             "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    run = calls[0]
    # the command line's hooks: its resumable state, its report in the plan, flag names in messages
    assert run.saver is not None and run.report_units > 0 and run.hooks.words is str  # its own words
    written = hardener.load(out, arch=ARCH).manifest.training
    assert written == json.loads(json.dumps(run.record.to_dict()))  # what the run recorded is what was written


def test_notebook_patch_shows_progress_plan_and_the_few_steps_warning(capsys, caplog, monkeypatch):
    monkeypatch.setenv("HARDEN_PROGRESS_SECONDS", "10")
    caplog.set_level(logging.INFO, logger="hardener")
    net, (x, y) = trained_tiny(), _data()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="optimiser steps") as seen:
        hardener.patch(net, (x, y), **FEW)
    assert int(str(next(w.message for w in seen if "optimiser" in str(w.message))).split()[1]) < FEW_STEPS
    assert any(w.filename == __file__ for w in seen)  # pointed at the caller's line, not at harden's
    err = capsys.readouterr().err
    assert "plan: recipe: preset transfer" in err and "optimiser steps" in err  # the plan
    first = re.search(r"^train 1/(\d+) ", err, re.M)  # progress lines (off a terminal): the first and the last
    assert first and re.search(rf"^train {first[1]}/{first[1]} ", err, re.M)
    assert any(r.name == "hardener" and r.getMessage().startswith("plan:") for r in caplog.records)
    few = str(next(w.message for w in seen if "optimiser" in str(w.message)))
    assert "raise epochs" in few and "--epochs" not in few  # the library's words (the command line says --epochs)


def test_notebook_patch_progress_false_is_silent_on_stderr(capsys):
    net, (x, y) = trained_tiny(), _data()
    capsys.readouterr()
    seen = []
    with pytest.warns(UserWarning, match="optimiser steps"):  # warnings still come, through `warnings`
        hardener.patch(net, (x, y), progress=False, **FEW)
        hardener.patch(net, (x, y), progress=lambda *a: seen.append(a), **FEW)
    assert capsys.readouterr().err == ""
    assert seen and seen[-1][0] == "train"  # a callable gets fit's progress as is


def test_notebook_patch_gets_the_post_training_report_the_cli_writes(runner, tiny_ckpt, tiny_data, tmp_path, capsys):
    """Issue 31: the report after training is the library's (`training.report`): `hardener.patch(report="quick")`
    returns the report `harden patch` writes, on held-out images of the data, with the same fields; its images leave
    `unlabeled="rest"`; `report=None` (the default) runs none."""
    net, (x, y) = trained_tiny(), _data()
    capsys.readouterr()
    with pytest.warns(UserWarning):
        patched = hardener.patch(net, (x, y), subset=40, unlabeled="rest", report="quick", eval_samples=15,
                                 eval_steps=2, **FEW)
    rep = patched.report
    assert isinstance(rep, hardener.Report) and rep.data["command"] == "patch" and rep.data["data"]["n"] == 15
    assert rep.clean is not None and rep.robust is not None and rep.transfer is not None
    assert rep.data["report_budget"]["budget"] == "quick" and not rep.data["report_budget"]["verdict"]
    assert rep.data["report_budget"]["full_evaluation"].startswith("hardener.evaluate(")
    assert rep.to_dict()["training"] == json.loads(json.dumps(patched.training_record.to_dict()))
    assert patched.training_record["split"]["unlabeled"]["pool"] == 90 - 40 - 15  # the report's images left out
    err = capsys.readouterr().err
    assert re.search(r"^      report: 15 images, apgd-ce 2 steps", err, re.M)  # in the plan, and in its estimate
    out = tmp_path / "p.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "block",
                             "--out", str(out), "--report", str(tmp_path / "r.json"), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    cli = json.loads((tmp_path / "r.json").read_text())
    assert set(cli) - set(rep.data) == {"checkpoint", "checkpoint_sha256", "invocation"}
    assert set(rep.data) <= set(cli) and set(cli["report_budget"]) == set(rep.data["report_budget"])
    with pytest.warns(UserWarning):
        assert hardener.patch(net, (x, y), **FEW).report is None


def test_library_report_arguments_are_checked():
    net, (x, y) = trained_tiny(), _data()
    for kw, match in ((dict(report="verdict"), "^report='verdict': choose quick or full$"),
                      (dict(eval_samples=10), "^eval_data, eval_samples and eval_steps are the report's"),
                      (dict(report="quick", eval_data="no/such/dir/"), "^eval_data 'no/such/dir/'"),
                      (dict(report="quick", eval_data=(torch.rand(9, 3, 8, 8), torch.zeros(9).long())),
                       r"^eval_data images are \(3, 8, 8\) \(C,H,W\) but the training images are \(1, 8, 8\)"),
                      (dict(report="quick", eval_samples=-1), "eval_samples"),
                      (dict(report="quick", eval_steps=0), "eval_steps"), (dict(report=1), "report")):
        with pytest.raises(InputError, match=match):
            hardener.patch(net, (x, y), **kw, **FEW)


def test_the_report_of_a_method_that_fine_tunes_the_base_keeps_the_original_as_its_base(capsys):
    """`method="adv-train"` fine-tunes every base weight: the report's base rows are the original model's (the command
    line keeps it; so does the library when a report is asked), not the fine-tuned one's."""
    net, (x, y) = trained_tiny(), _data()
    xe, ye = x[:30], y[:30]
    with pytest.warns(UserWarning):
        patched = hardener.patch(net, (x[30:], y[30:]), method="adv-train", report="quick", eval_data=(xe, ye),
                                 eval_samples=0, eval_steps=1, eps=0.1, epochs=1, steps=1, batch_size=32, lr=0.5,
                                 progress=False)
    original = hardener.evaluate(net, (xe, ye), attacks="fgsm", eps=0.1, checks=False, threat="whitebox",
                                 progress=False)
    assert patched.report.data["data"]["n"] == 30
    assert patched.report.base_clean == original.clean


def test_cli_patch_enters_each_progress_view_once(runner, tiny_ckpt, tiny_data, tmp_path, monkeypatch):
    """A view entered twice would leave its first live display running on a terminal (its cursor hidden)."""
    from hardener.cli.commands import patch as cmd

    entered = []

    class Counting(cmd.ProgressView):
        def __enter__(self):
            entered.append(id(self))
            return super().__enter__()

    monkeypatch.setattr(cmd, "ProgressView", Counting)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "block",
                             "--out", str(tmp_path / "p.safetensors"), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    assert len(entered) >= 2 and len(entered) == len(set(entered))  # training's and the report's, once each
