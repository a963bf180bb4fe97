"""Issue 35, item 5: SIGINT and SIGTERM in every phase of patch (training, validation, the report after training),
eval (attacks, sweep, report) and certify (writing) exit 130 with one line, keep what can be resumed, leave none of
the run's outputs and no --out lock; --resume then finishes with the uninterrupted run's numbers. Distributed
variables without a launcher are an error, never a hang."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from hardener import attacks as A
from hardener.cli.app import main

from conftest import ARCH, HERE

ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "HARDEN_PROGRESS_SECONDS": "0.05"}


def _signal_in_phase(args: list[str], slow: str, phase: str, sig: int) -> tuple[int, str]:
    """Run harden with attack `slow` (`NAME[@EPS]`, tests/slow_cli.py) 3 s slower a call, made in the phase alone;
    send `sig` once a stderr line starts with `phase` (the phase's own progress line: no fixed sleep); its exit code
    and stderr."""
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_cli.py"), slow, "3", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(s) for s in proc.stderr] + [lines.put(None)], daemon=True).start()
    seen, deadline = [], time.time() + 120
    while True:
        line = lines.get(timeout=max(1.0, deadline - time.time()))
        assert line is not None, "the run ended before the phase: " + "".join(seen)
        seen.append(line)
        if line.startswith(phase):
            proc.send_signal(sig)
            break
    proc.wait(timeout=120)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    return proc.returncode, "".join(seen[seen.index(next(s for s in seen if s.startswith(phase))) + 1:])


def _one_line(err: str, *needles: str) -> None:
    """After the signal: progress lines perhaps, then one line (no traceback) saying what was kept."""
    lines = [s for s in err.splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("Error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("Error: interrupted"), err
    for n in needles:
        assert n in errors[0], errors[0]


def _patch_args(tmp_path, tiny_ckpt, tiny_data, out, *extra) -> list[str]:
    return ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--at",
            "features,block", "--out", str(out), "--epochs", "2", "--steps", "2", "--eps", "0.1", "--eval-samples",
            "15", "--eval-steps", "2", "--batch-size", "32", "--attack", "fgsm", *extra]


def _left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sigint_in_the_patch_report_keeps_the_state_and_writes_nothing(tmp_path, tiny_ckpt, tiny_data):
    """The report after training is a phase of its own: Ctrl-C there exits 130 (it used to end 0), removes the
    checkpoint and report it wrote, keeps the trained state; --resume writes them without training again."""
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    args = _patch_args(tmp_path, tiny_ckpt, tiny_data, out, "--report", str(report))
    code, err = _signal_in_phase(args, "apgd-ce", "base whitebox apgd-ce", signal.SIGINT)
    assert code == 130, err
    _one_line(err, "--resume", "o.safetensors.partial")
    assert not out.exists() and not report.exists()
    assert not (tmp_path / ".o.safetensors.lock").exists()
    assert (tmp_path / "o.safetensors.partial").exists()
    # the resume and the reference run in processes like the first (one thread: checkpoints are bit-identical for a
    # seed at the same thread count, and pytest's own process may use more)
    harden = [sys.executable, "-m", "hardener"]
    r = subprocess.run([*harden, *args, "--resume", "--quiet"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run([*harden, *_patch_args(tmp_path, tiny_ckpt, tiny_data, ref, "--quiet")], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert _left(tmp_path) == ["o.safetensors", "r.json", "ref.safetensors"]


def test_sigterm_in_the_last_validation_is_not_lost(monkeypatch, capsys, runner, tmp_path, tiny_ckpt, tiny_data):
    """A signal in the last epoch's validation (after the last step) stops the run too: it used to be swallowed
    (training checks its flag between steps) and SIGTERM killed the process with no message and a stale lock."""
    out = tmp_path / "o.safetensors"
    args = _patch_args(tmp_path, tiny_ckpt, tiny_data, out, "--validate", "15", "--epochs", "1", "--quiet")
    _signal_on_call(monkeypatch, "pgd", signal.SIGTERM, 1)  # validation's PGD-10 (training attacks with FGSM)
    code, err = _run_cli(args, capsys)
    assert code == 130, err
    _one_line(err, "--resume")
    assert _left(tmp_path) == ["o.safetensors.partial", "o.safetensors.partial.adv.safetensors"]
    r = runner.invoke(main, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert _left(tmp_path) == ["o.safetensors"]


def _eval_args(patched_ckpt, tiny_test_data, state, *extra) -> list[str]:
    return ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "pgd", "--steps",
            "2", "--eps", "0.1", "--eps-sweep", "0.05,0.1", "--batch-size", "64", "--state-dir", str(state), *extra]


def _numbers(rep: dict) -> dict:
    """The report's numbers (not its timings)."""
    models = {m: {t: [a["robust_after"] for a in v["attacks"]] for t, v in d["threats"].items()}
              for m, d in rep["models"].items()}
    return {"models": models, "sweep": rep["eps_sweep"], "checks": [(c["name"], c["status"]) for c in rep["checks"]]}


def test_sigterm_in_the_eps_sweep_resumes_to_the_same_numbers(runner, tmp_path, patched_ckpt, tiny_test_data):
    state, report = tmp_path / "st", tmp_path / "r.json"
    args = _eval_args(patched_ckpt, tiny_test_data, state, "--report", str(report))
    code, err = _signal_in_phase(args, "pgd@0.05", "sweep eps=", signal.SIGTERM)
    assert code == 130, err
    _one_line(err, "--resume")
    assert not report.exists() and len(list(state.glob(".harden-eval-*.partial"))) == 1
    r = runner.invoke(main, [*args, "--resume", "--quiet"])
    assert r.exit_code == 0, r.output
    ref = runner.invoke(main, [*_eval_args(patched_ckpt, tiny_test_data, tmp_path / "st2"), "--json", "--quiet"])
    assert _numbers(json.loads(report.read_text())) == _numbers(json.loads(ref.stdout))
    assert not list(state.iterdir())


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    """The console entry point in this process (its SIGTERM handling included): exit code and stderr."""
    from hardener.cli.app import run

    old = sys.argv
    sys.argv = ["harden", *args]
    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def _signal_on_call(monkeypatch, name: str, sig: int, at: int) -> None:
    """Attack `name` signals this process on its `at`-th call (a deterministic point inside a phase)."""
    real, calls = A.REGISTRY[name], [0]

    def build(model, spec):
        inner = real.build(model, spec)

        def run(x, y):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), sig)
            return inner(x, y)
        return run
    monkeypatch.setitem(A.REGISTRY, name, A.AttackInfo(name, build, real.kind, real.steps))


def test_sigterm_in_an_attack_saves_the_finished_attacks(monkeypatch, capsys, tmp_path, patched_ckpt,
                                                         tiny_test_data):
    """SIGTERM in the patched model's white-box attack (the base's is finished): exit 130, the state names it, the
    installed handler is gone afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    state, report = tmp_path / "st", tmp_path / "r.json"
    args = _eval_args(patched_ckpt, tiny_test_data, state, "--report", str(report), "--quiet")
    _signal_on_call(monkeypatch, "pgd", signal.SIGTERM, 2)
    code, err = _run_cli(args, capsys)
    assert code == 130 and err.count("\n") == 1, err
    _one_line(err, "progress saved", "--resume")
    assert not report.exists() and len(list(state.glob(".harden-eval-*.partial"))) == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_while_certify_writes_removes_what_it_wrote(monkeypatch, capsys, tmp_path, tiny_ckpt,
                                                          tiny_test_data):
    """Between certify's --tsv and its --report: neither is left, every certified row is saved for --resume."""
    from hardener.cli.commands import certify as cmd

    real, calls = cmd.atomic_write, []

    def write(path, fn):
        calls.append(path)
        real(path, fn)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(cmd, "atomic_write", write)
    tsv, report = tmp_path / "rows.tsv", tmp_path / "r.json"
    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0", "10",
            "--n", "50", "--max-samples", "4", "--quiet", "--tsv", str(tsv), "--report", str(report)]
    code, err = _run_cli(args, capsys)
    assert code == 130, err
    _one_line(err, "4 samples saved", "--resume")
    assert not tsv.exists() and not report.exists()
    monkeypatch.setattr(cmd, "atomic_write", real)
    code, err = _run_cli([*args, "--resume"], capsys)
    assert code == 0 and tsv.exists() and report.exists(), err


@pytest.mark.parametrize("env,code,needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, 2, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, 2, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "HARDEN_RENDEZVOUS_SECONDS": "1"}, 3,
     "did not all meet"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "HARDEN_RENDEZVOUS_SECONDS": "1"}, 3,
     "nothing listens"),
])
def test_distributed_variables_without_a_launcher_never_hang(runner, monkeypatch, patched_ckpt, tiny_test_data, env,
                                                             code, needle):
    import socket

    from conftest import assert_error

    if "MASTER_ADDR" in env and "HARDEN_RENDEZVOUS_SECONDS" in env:
        with socket.socket() as s:  # a free port: nobody else comes to this rendezvous
            s.bind(("127.0.0.1", 0))
            env = {**env, "MASTER_PORT": str(s.getsockname()[1])}
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    r = runner.invoke(main, ["eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack",
                             "fgsm", "--eps", "0.1", "--quiet", "--no-checks"])
    assert_error(r, code, needle)
    assert time.time() - t0 < 30


def test_interrupts_at_start_up_are_one_line(tmp_path, patched_ckpt, tiny_test_data):
    """Ctrl-C or SIGTERM while the interpreter loads harden, torch and the data: exit 130 and one line, whenever it
    lands (it used to give a KeyboardInterrupt traceback, a bare -15, an exit by SIGINT after the line, or numpy
    half imported and recursing). The assertion holds at any moment after the interpreter's own start (site, in
    the first tenths of a second, is Python's), so the delays cannot race."""
    args = [sys.executable, "-m", "hardener", "eval", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data),
            "--attack", "fgsm", "--quiet", "--no-checks"]
    runs = [(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV), sig, at)
            for sig, at in ((signal.SIGINT, 0.8), (signal.SIGTERM, 2.0))]
    t0 = time.time()
    for proc, sig, at in runs:
        time.sleep(max(0.0, t0 + at - time.time()))
        proc.send_signal(sig)
    for proc, sig, at in runs:
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode in (0, 130), (sig, at, proc.returncode, err)
        lines = err.splitlines()  # one line: "interrupted", and what was kept where a phase had begun
        assert proc.returncode == 0 or (len(lines) == 1 and lines[0].startswith("Error: interrupted")), (sig, at, err)


def test_sigterm_while_export_checks_its_file_leaves_nothing(monkeypatch, capsys, tmp_path, patched_ckpt):
    from hardener.io import export as X

    def check(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(X, "check_in_fresh_interpreter", check)
    target = tmp_path / "m.ts.pt"
    code, err = _run_cli(["export", str(patched_ckpt), "--arch", ARCH, "--out", str(target), "--quiet"], capsys)
    assert code == 130, err
    _one_line(err, "nothing was written")
    assert _left(tmp_path) == []
