"""Issue 35, item 4: option values in physical ranges, standard JSON reports, gates that cannot lie."""
from __future__ import annotations

import json
import math

import pytest
import torch

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.reports import report as R

from conftest import ARCH, assert_input_error, trained_tiny


def _patch(runner, ckpt, data, out, *extra):
    return runner.invoke(main, ["patch", str(ckpt), "--arch", ARCH, "--data", str(data), "--out", str(out),
                                "--epochs", "1", "--steps", "2", "--eval-samples", "0", "--quiet", *extra])


@pytest.mark.parametrize("flag,value", [("--std", "inf"), ("--std", "0"), ("--std", "1e-45"), ("--std", "nan"),
                                        ("--mean", "nan"), ("--mean", "-inf"), ("--mean", "1e39")])
def test_normalisation_must_be_finite_and_std_positive(runner, tmp_path, tiny_ckpt, tiny_data, flag, value):
    out = tmp_path / "o.safetensors"
    r = _patch(runner, tiny_ckpt, tiny_data, out, flag, value)
    assert_input_error(r, flag)
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["eval", "predict", "certify"])
@pytest.mark.parametrize("flag,value", [("--std", "0"), ("--std", "nan"), ("--mean", "inf")])
def test_normalisation_is_checked_for_a_patched_checkpoint_too(runner, patched_ckpt, tiny_test_data, cmd, flag,
                                                               value):
    """A patched file's own input spec wins over --mean/--std, but a value out of range is still refused: never a
    run that looks as if it used it."""
    extra = {"eval": ["--attack", "fgsm", "--no-checks"], "predict": [], "certify": ["--n0", "5", "--n", "20"]}[cmd]
    r = runner.invoke(main, [cmd, str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--max-samples",
                             "3", "--quiet", *extra, *(["--mean", "0"] if flag == "--std" else []), flag, value])
    assert_input_error(r, flag)


@pytest.mark.parametrize("value", ["nan", "0", "-3", "x"])
def test_holdout_is_checked_where_nothing_is_held_out(runner, tmp_path, tiny_ckpt, tiny_data, value):
    r = _patch(runner, tiny_ckpt, tiny_data, tmp_path / "o.safetensors", "--subset", "30", "--holdout", value)
    assert_input_error(r, "--holdout")


def test_library_normalisation_is_checked_too():
    net = trained_tiny(steps=1)
    for kw in ({"std": [float("inf")]}, {"mean": [float("nan")]}, {"std": "1e-45"}):
        with pytest.raises(InputError, match="finite"):
            hardener.as_patched(net, **kw)


@pytest.mark.parametrize("flag,value", [("--seed", str(2 ** 64)), ("--seed", str(2 ** 63)), ("--seed", "-1"),
                                        ("--epochs", str(2 ** 64)), ("--batch-size", str(2 ** 63)),
                                        ("--steps", "99999999999999999999999"), ("--lr", "1e400")])
def test_counts_and_seeds_out_of_range_are_one_line(runner, tmp_path, tiny_ckpt, tiny_data, flag, value):
    r = _patch(runner, tiny_ckpt, tiny_data, tmp_path / "o.safetensors", flag, value)
    assert_input_error(r, flag)


@pytest.mark.parametrize("toml,needle", [
    ("epochs = inf\n", "epochs"), ("steps = 1e400\n", "steps"), (f"seed = {2 ** 64}\n", "seed"),
    ("[patch]\nlr = nan\n", "lr"), (f"[patch]\nbatch_size = {2 ** 40}\n", "--batch-size"),
    ('std = "inf"\n', "--std"), (f"seed = {2 ** 63 - 1}\nepochs = {2 ** 40}\n", "--epochs"),
])
def test_config_numbers_out_of_range_are_one_line(runner, tmp_path, tiny_ckpt, tiny_data, monkeypatch, toml, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "harden.toml").write_text(toml)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out",
                             str(tmp_path / "o.safetensors"), "--eval-samples", "0", "--quiet"])
    assert_input_error(r, needle)
    assert "Traceback" not in r.output and not isinstance(r.exception, OverflowError)


def test_subset_that_leaves_no_images_is_exit_2(runner, tmp_path, tiny_ckpt, tiny_data, patched_ckpt,
                                                 tiny_test_data):
    r = _patch(runner, tiny_ckpt, tiny_data, tmp_path / "o.safetensors", "--subset", "0.001")
    assert_input_error(r, "--subset", "leaves none")
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--subset",
                             "0.001", "--attack", "fgsm", "--quiet", "--no-checks"])
    assert_input_error(r, "--subset", "leaves none")


def test_reports_are_standard_json():
    rep = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf, "e": 0.5}}
    text = R.json_text(rep)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 0.5}}
    assert json.loads(R.RENDERERS[".json"](rep), parse_constant=refuse)["a"] is None


def test_library_report_to_json_is_standard(tiny_test_data, patched_ckpt):
    report = hardener.evaluate(hardener.load(patched_ckpt, arch=ARCH), str(tiny_test_data), attacks="fgsm", eps=0.1,
                               checks=False, max_samples=6)
    report.data["models"]["patched"]["clean"]["nan_probe"] = float("nan")  # a value no finite run produces

    def refuse(name):
        raise AssertionError(name)

    assert json.loads(report.to_json(), parse_constant=refuse)["models"]["patched"]["clean"]["nan_probe"] is None


@pytest.mark.parametrize("extra,needle", [
    (["--attack", "deepfool"], "iterative"),  # a minimum-norm search, not a loss maximised in the eps-ball
    (["--attack", "cw-l2"], "iterative"),
    (["--attack", "apgd-ce", "--steps", "1"], "--steps 1"),
    (["--attack", "pgd,fgsm", "--steps", "1"], "--steps 1"),
])
def test_gates_need_a_strong_attack(runner, patched_ckpt, tiny_test_data, extra, needle):
    base = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1", "--quiet",
            "--no-checks", "--threat", "whitebox"]
    r = runner.invoke(main, [*base, *extra, "--fail-under", "robust=0.0"])
    assert_input_error(r, "--fail-under robust=", needle, "--allow-weak-gate")
    r = runner.invoke(main, [*base, *extra, "--fail-under", "clean=0.0"])  # a clean gate needs no attack strength
    assert r.exit_code != 2 or "--fail-under" not in r.output, r.output


def test_gate_accepts_two_step_apgd_and_weak_gate_flag(runner, patched_ckpt, tiny_test_data):
    base = ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1", "--quiet",
            "--no-checks", "--threat", "whitebox", "--max-samples", "6", "--fail-under", "robust=0.0"]
    assert runner.invoke(main, [*base, "--attack", "apgd-ce", "--steps", "2"]).exit_code == 0
    r = runner.invoke(main, [*base, "--attack", "apgd-ce", "--steps", "1", "--allow-weak-gate"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("value", ["softplus:nan", "softplus:inf", "softplus:-1"])
def test_smooth_grad_must_be_finite(runner, patched_ckpt, tiny_test_data, value):
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "apgd-ce", "--fail-under", "robust=0.0", "--smooth-grad", value, "--quiet", "--no-checks"])
    assert_input_error(r, "--smooth-grad")


def test_seed_limit_is_what_torch_takes():
    torch.manual_seed(2 ** 63 - 1)  # the largest seed harden accepts works


@pytest.mark.parametrize("value", ["5000", "1000000", str(2 ** 31 - 1)])
def test_a_width_no_checkpoint_holds_is_refused(runner, tmp_path, tiny_ckpt, tiny_data, value):
    """A pre-filter wider than a checkpoint's manifest may record (4096) would train a file that cannot be loaded."""
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out",
                             str(tmp_path / "o.safetensors"), "--quiet", "--width", value])
    assert_input_error(r, "--width", "4096")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("cmd,flag,value", [
    ("layers", "--input-shape", "1x1000000x1000000"), ("patch", "--input-shape", "3,100000,1000000"),
    ("certify", "--batch-size", str(2 ** 31 - 1)),
])
def test_sizes_beyond_the_memory_are_refused_before_allocating(runner, tmp_path, tiny_ckpt, tiny_data, tiny_test_data,
                                                               cmd, flag, value):
    """Values whose tensors alone exceed any memory: one line, exit 2, nothing allocated (a traceback or an
    allocator's error before)."""
    args = {"patch": ["--data", str(tiny_data), "--out", str(tmp_path / "o.safetensors"), "--quiet"],
            "layers": [],
            "certify": ["--data", str(tiny_test_data), "--n", str(2 ** 31 - 1), "--max-samples", "2", "--quiet"]}[cmd]
    r = runner.invoke(main, [cmd, str(tiny_ckpt), "--arch", ARCH, *args, flag, value])
    assert_input_error(r, flag, "GiB of memory")
    assert not (tmp_path / "o.safetensors").exists()


def test_large_but_reasonable_sizes_pass():
    from hardener.cli import boundary as B
    from hardener.options import validate as V

    B.check_sizes({"width": 2048, "input_shape": "3,1024,1024"})
    V.check_batch_memory(1000, [3, 224, 224], 3)
    with pytest.raises(InputError, match="--width"):
        B.check_sizes({"width": 10 ** 6})
