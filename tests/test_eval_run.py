"""One run, two faces (issue 31, item 1, for evaluation): `harden eval` and `hardener.evaluate` run the same library
code (`hardener.evaluation.run.eval_run`), give the same numbers, and a notebook gets what the command line shows: progress
and the warnings about the model and the data."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import hardener
from hardener.cli.app import main
from hardener.errors import InputError, RunError
from hardener.evaluation import run as EV

from conftest import ARCH, make_data, trained_tiny

EVAL = dict(attacks="pgd", eps=0.1, steps=2, checks=False, threat="whitebox,transfer", max_samples=30, seed=3)
CLI_EVAL = ["--attack", "pgd", "--eps", "0.1", "--steps", "2", "--no-checks", "--threat", "whitebox,transfer",
            "--max-samples", "30", "--seed", "3"]


def _numbers(obj):
    """A report's part without what the clock measured (seconds, images per second)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items() if k not in ("seconds", "images_per_s")}
    return [_numbers(v) for v in obj] if isinstance(obj, list) else obj


def _data(n=60):
    imgs, labels = make_data(n=n, seed=7)
    return imgs.float() / 255, labels


def test_cli_eval_runs_the_library_run(runner, patched_ckpt, tiny_test_data, tmp_path, monkeypatch):
    calls = []
    real = EV.eval_run

    def spy(run):
        calls.append(run)
        return real(run)

    monkeypatch.setattr(EV, "eval_run", spy)
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), *CLI_EVAL,
                             "--state-dir", str(tmp_path), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    run = calls[0]
    # the command line's hooks: its resumable store, flag names in messages; its fields in the report
    assert run.store is not None and run.store.path.parent == tmp_path and run.hooks.words is str  # its own words
    assert run.report["checkpoint"] == str(patched_ckpt) and len(run.ds) == 30
    printed = json.loads(r.stdout)
    assert _numbers(printed["models"]) == _numbers(json.loads(hardener.reports.report.json_text(run.report))["models"])  # what it made is shown


def test_library_and_cli_give_the_same_numbers(runner, patched_ckpt, tiny_test_data):
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), *CLI_EVAL,
                             "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    torch.manual_seed(12345)  # the library does not seed the global generator: the run's seed alone decides
    lib = hardener.evaluate(hardener.load(patched_ckpt, arch=ARCH), str(tiny_test_data), progress=False,
                            **EVAL).to_dict()
    assert _numbers(cli["models"]) == _numbers(lib["models"]) and cli["attack_settings"] == lib["attack_settings"]
    assert cli["data"]["fingerprint"] == lib["data"]["fingerprint"] and cli["data"]["n"] == lib["data"]["n"] == 30
    assert {k: v for k, v in cli["summary"].items() if "seconds" not in k and not k.startswith("gates")} == \
        {k: v for k, v in lib["summary"].items() if "seconds" not in k}
    assert 0 < lib["models"]["patched"]["threats"]["transfer"]["robust"]["accuracy"] <= 1


def test_notebook_evaluate_shows_progress_on_stderr(capsys, caplog, monkeypatch):
    monkeypatch.setenv("HARDEN_PROGRESS_SECONDS", "10")
    caplog.set_level(logging.INFO, logger="hardener")
    net, (x, y) = trained_tiny(), _data()
    capsys.readouterr()
    rep = hardener.evaluate(net, (x, y), attacks="fgsm", eps=0.1, checks=False, threat="whitebox",
                            batch_size="auto")
    err = capsys.readouterr().err
    # progress lines (off a terminal): the phase's first and last; the batch size the run chose, as a note
    first = re.search(r"^base whitebox fgsm 0/(\d+)", err, re.M)
    assert first and re.search(rf"^base whitebox fgsm {first[1]}/{first[1]} ", err, re.M), err
    assert re.search(r"^batch size: auto -> \d+$", err, re.M), err
    assert any(r.name == "hardener" and r.getMessage().startswith("batch size: auto") for r in caplog.records)
    assert rep.clean > 0.9


def test_notebook_evaluate_progress_false_is_silent_and_warns_through_warnings(capsys):
    net, (x, y) = trained_tiny(), _data()
    constant = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))  # class 0 for every image: chance
    torch.nn.init.zeros_(constant[1].weight)
    constant[1].bias.data = torch.tensor([1.0, 0.0, 0.0])
    wrong = dict(attacks="fgsm", eps=0.1, checks=False, threat="whitebox")
    capsys.readouterr()
    seen = []
    hardener.evaluate(net, (x, y), attacks="fgsm", eps=0.1, checks=False, threat="whitebox", progress=False)
    hardener.evaluate(net, (x, y), attacks="fgsm", eps=0.1, checks=False, threat="whitebox",
                      progress=lambda *a: seen.append(a))
    with pytest.warns(UserWarning, match="about chance") as warned:  # a warning comes anyway, at the caller's line
        rep = hardener.evaluate(constant, (x, y), progress=False, allow_low_accuracy=True, **wrong)
    assert capsys.readouterr().err == ""
    assert seen and seen[-1][0] == "base whitebox fgsm"  # a callable gets evaluation's progress as is
    assert any(w.filename == __file__ for w in warned)
    assert any("about chance" in n for n in rep.data["data"]["warnings"])
    with pytest.raises(InputError, match="allow_low_accuracy=True"):  # the library's error names its parameter
        hardener.evaluate(constant, (x, y), progress=False, **wrong)
    with pytest.raises(InputError, match="^precision must be one of"):
        hardener.evaluate(net, (x, y), attacks="fgsm", precision="fp8")


class _NoMemory(torch.nn.Module):
    def forward(self, x):
        raise torch.OutOfMemoryError("no memory")


def test_auto_batch_size_errors_speak_the_callers_language():
    from hardener.api import _keywords
    from hardener.options.wording import python_words

    x, y = _data(8)
    with pytest.raises(RunError, match=r"^--batch-size auto: out of memory .*\(--device\)") as e:
        hardener.evaluation.threats.find_batch_size(_NoMemory(), x, y, torch.device("cpu"))
    # the same message, as `hardener.evaluate` raises it (its words: options.wording)
    assert re.match(r"^batch_size='auto': out of memory .*\(device=\)",
                    python_words(e.value.message, _keywords(hardener.evaluate)))
