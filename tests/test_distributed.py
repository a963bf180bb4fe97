"""Issue 17: `torchrun -m hardener eval` shards an evaluation over processes (gloo on CPU, 2 processes started by
the test) and gives the same report as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from hardener.cli.app import main
from hardener.runtime import distributed as D

from conftest import ARCH, FAST_PATCH, HERE

ROOT = HERE.parent


def test_shards_are_whole_blocks_covering_every_sample_once():
    for n, block, size in ((70, 16, 2), (70, 16, 3), (10, 16, 2), (64, 16, 4), (1, 1, 1)):
        parts = [D.shard(n, block, D.World(r, size, r)) for r in range(size)]
        allidx = torch.cat(parts)
        assert sorted(allidx.tolist()) == list(range(n))
        for r, p in enumerate(parts):
            blocks = sorted({i // block for i in p.tolist()})
            assert all(k % size == r for k in blocks)
            assert p.tolist() == sorted(p.tolist())


def _strip(rep: dict) -> dict:
    """What must agree: everything but timings (the attacks', the latency), the time stamp, the command line and the
    process count."""
    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items() if k not in ("seconds", "seconds_per_image", "images_per_s",
                                                                   "created", "environment", "processes", "command",
                                                                   "invocation", "latency", "latency_ratio")}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o
    return walk(rep)


@pytest.fixture(scope="module")
def prefilter_ckpt(tmp_path_factory, tiny_ckpt, tiny_data):
    out = tmp_path_factory.mktemp("dist") / "pf.safetensors"
    r = CliRunner().invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset",
                                  "0.5", "--at", "prefilter:input,block", "--width", "4", "--out", str(out),
                                  *FAST_PATCH])
    assert r.exit_code == 0, r.output
    return out


def _run(args: list[str], env_extra: dict | None = None, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    launcher = [sys.executable, "-m", "hardener"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m",
         "hardener"]
    return subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_sharded_eval_equals_one_process(prefilter_ckpt, tiny_test_data, tmp_path):
    args = ["eval", str(prefilter_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1",
            "--attack", "apgd-ce,fgsm,square", "--queries", "30", "--steps", "4", "--batch-size", "8",
            "--threat", "all", "--eps-sweep", "0,0.05", "--json", "--quiet"]
    one = _run(args)
    assert one.returncode == 0, one.stderr
    two = _run([*args, "--report", str(tmp_path / "r.json"), "--state-dir", str(tmp_path / "state")], procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 1 prints nothing: stdout is one JSON document
    assert b["processes"] == 2
    assert json.loads((tmp_path / "r.json").read_text())["processes"] == 2
    assert _strip(a) == _strip(b)
    pa, pb = a["models"]["patched"], b["models"]["patched"]
    assert pa["per_sample_broken_by"] == pb["per_sample_broken_by"] and len(pa["per_sample_broken_by"]) == 45
    assert {"whitebox", "adaptive", "transfer", "blackbox"} <= set(pb["threats"])
    assert not list((tmp_path / "state").glob("*.partial"))  # every rank cleared its state


def test_sharded_certify_equals_one_process(tiny_ckpt, tiny_test_data, tmp_path):
    """`torchrun -m hardener certify`: each process certifies every other sample, rank 0 writes the report and the
    TSV; the rows are one process's (each sample's noise is seeded by its position), and no state is left."""
    args = ["certify", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--sigma", "0.12", "--n0", "20",
            "--draws", "300", "--alpha", "0.01", "--max-samples", "11", "--json", "--quiet"]  # --n: torchrun's
    one = _run(args)
    assert one.returncode == 0, one.stderr
    two = _run([*args, "--tsv", str(tmp_path / "r.tsv"), "--state-dir", str(tmp_path / "state")], procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 1 prints nothing: stdout is one JSON document
    assert b["processes"] == 2 and "processes" not in a
    assert _strip(a) == _strip(b) and len(b["rows"]) == 11
    assert [r["idx"] for r in b["rows"]] == list(range(11))
    assert len((tmp_path / "r.tsv").read_text().splitlines()) == 12
    assert not list((tmp_path / "state").glob(".harden-certify-*"))  # every rank cleared its state


def test_sharded_eval_refuses_base_cache_with_one_line(prefilter_ckpt, tiny_test_data, tmp_path):
    r = _run(["eval", str(prefilter_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1", "--steps",
              "2", "--base-cache", str(tmp_path / "c"), "--quiet", "--no-checks"], procs=2)
    assert r.returncode != 0 and "--base-cache is not supported with several processes" in r.stderr


def test_lower_precision_attacks_are_labelled(runner, prefilter_ckpt, tiny_test_data):
    """--precision bf16 runs the attacks under autocast, scores in fp32 and says so in the report; clean accuracy
    (no attack) is unchanged."""
    base = ["eval", str(prefilter_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1", "--steps",
            "3", "--threat", "whitebox", "--no-checks", "--json", "--quiet"]
    a = runner.invoke(main, base)
    b = runner.invoke(main, [*base, "--precision", "bf16"])
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    assert ra["precision"] == "fp32" and rb["precision"] == "bf16"
    assert any("bf16" in w and "overstated" in w for w in rb["data"]["warnings"]) and not ra["data"]["warnings"]
    assert ra["models"]["patched"]["clean"] == rb["models"]["patched"]["clean"]
    assert abs(ra["summary"]["robust"] - rb["summary"]["robust"]) <= 0.25


def test_batch_size_auto_finds_the_largest_that_fits(runner, prefilter_ckpt, tiny_test_data):
    from test_eval import _Picky

    from hardener.evaluation import threats as E

    from conftest import trained_tiny

    net = trained_tiny()
    x, y = torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)
    assert E.find_batch_size(_Picky(net, 100), x, y, torch.device("cpu"), cap=1024) == 64
    assert E.find_batch_size(net, x, y, torch.device("cpu")) == 256  # CPU: capped, memory is not the limit
    with pytest.raises(Exception, match="even for one image"):
        E.find_batch_size(_Picky(net, 0), x, y, torch.device("cpu"))
    args = ["eval", str(prefilter_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--eps", "0.1", "--steps",
            "2", "--threat", "whitebox", "--no-checks"]
    r = runner.invoke(main, [*args, "--batch-size", "auto"])
    assert r.exit_code == 0, r.output
    assert "batch size: auto -> 256" in r.stderr
    for bad in ("0", "x", "-3"):
        r = runner.invoke(main, [*args, "--batch-size", bad])
        assert r.exit_code == 2 and "--batch-size" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- distributed patch training


PATCH2 = ["--at", "features,block", "--epochs", "3", "--steps", "2", "--eps", "0.1", "--batch-size", "16",
          "--report-budget", "quick", "--eval-samples", "15", "--eval-steps", "2", "--quiet", "--adversary",
          "patched", "--subset", "0.6"]


def test_sharded_patch_training_resumes_to_the_uninterrupted_result(tmp_path, tiny_ckpt, tiny_data):
    """Two processes write one checkpoint (rank 0 prints it, the base bit-identical), and a run stopped by SIGTERM
    resumes to exactly the uninterrupted result. (1 vs 2 processes: the gradient test below.)"""
    import signal
    import time

    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole.safetensors", tmp_path / "cut.safetensors"
    base = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), *PATCH2, "--epochs", "6",
            "--save-every", "1"]
    r = _run([*base, "--out", str(whole)], procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(whole)  # rank 0 alone prints the path
    assert not list(tmp_path.glob("*.partial*"))  # the finished run leaves no state behind
    a, orig = load_file(str(whole)), load_file(str(tiny_ckpt))
    assert all(torch.equal(a[k], orig[k]) for k in orig)  # the base stays bit-identical
    assert any(k.startswith("harden.") for k in a)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "hardener", *base, "--out", str(cut)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    state = tmp_path / "cut.safetensors.partial"
    t0 = time.time()
    while not state.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    if cut.exists():
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode != 0 and state.exists(), err[-2000:]
    r = _run([*base, "--out", str(cut), "--resume"], procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(whole)), load_file(str(cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- precision and memory in training


def test_training_out_of_memory_splits_the_batch_and_finishes(capsys):
    from test_eval import _Picky

    from hardener import api
    from hardener import data as hdata
    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import PatchedModel
    from hardener.patches.layers import probe
    from hardener.training import fit as F
    from hardener.training import steps

    from conftest import make_data, trained_tiny

    imgs, labels = make_data(n=64)
    ds = hdata.Dataset(imgs, labels)
    opts = api.PatchOptions(at="net.block", epochs=2, steps=2, eps=0.1, batch_size=32, adversary="patched")
    p = PatchedModel(Classifier(_Picky(trained_tiny(), 8), InputSpec(shape=[1, 8, 8])))
    infos = probe(p.model, torch.rand(2, 1, 8, 8))
    steps.attach_patches(p, infos, opts, say=lambda t: None)
    spec, cfg = steps.training_setup(opts, 3)
    info: dict = {}
    logs = F.fit(p, ds, spec, cfg, torch.device("cpu"), info=info)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e.loss)) for e in logs)
    assert [o["pieces"] for o in info["out_of_memory"]] == [2, 4]  # 32 -> 16 -> 8 images per piece
    assert "out of memory in training" in capsys.readouterr().err
    # one image still too many: exit 3 with one line
    from hardener.errors import RunError

    p0 = PatchedModel(Classifier(_Picky(trained_tiny(), 0), InputSpec(shape=[1, 8, 8])))
    steps.attach_patches(p0, infos, opts, say=lambda t: None)  # the same layers (its own forward always fails)
    with pytest.raises(RunError, match="even one image at a time"):
        F.fit(p0, ds, spec, cfg, torch.device("cpu"))


def test_training_in_bf16_keeps_an_fp32_checkpoint(runner, tmp_path, tiny_ckpt, tiny_data):
    from safetensors.torch import load_file

    out = tmp_path / "bf16.safetensors"
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--precision",
                             "bf16", "--out", str(out), "--report", str(tmp_path / "r.json"), *PATCH2])
    assert r.exit_code == 0, r.output
    t = load_file(str(out))
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.startswith("harden."))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["training"]["config"]["precision"] == "bf16"
    assert rep["summary"]["clean"] > 0.5


def test_validation_attacks_run_at_the_training_precision(monkeypatch):
    # --precision bf16: the per-epoch validation's PGD-10 runs under autocast like the training attack (it was fp32,
    # 40% of a bf16 epoch on the demo); the examples are scored in fp32 by the model itself.
    from hardener import attacks as A
    from hardener import data as hdata
    from hardener.evaluation.threats import Autocast
    from hardener.training import fit as F

    from conftest import make_data, trained_tiny

    seen = []
    build = A.build
    monkeypatch.setattr(A, "build", lambda model, spec: seen.append(model) or build(model, spec))
    imgs, labels = make_data(n=20)
    net = trained_tiny()
    spec = A.AttackSpec("pgd", eps=0.1, steps=2)
    for amp, kind in ((torch.bfloat16, Autocast), (None, type(net))):
        seen.clear()
        v = F._Validation(hdata.Dataset(imgs, labels), spec, 8, torch.device("cpu"), net, amp)
        clean, robust, transfer = v(net)
        assert [type(m) for m in seen] == [kind, kind] and 0 <= robust <= clean <= 1 and 0 <= transfer <= 1
        if amp is not None:
            assert all(m.dtype == torch.bfloat16 and m.model is net for m in seen)


def test_sharded_training_sums_the_gradients_of_the_whole_batch(tmp_path, tiny_ckpt, tiny_data):
    """Fixers only (no batch statistics), the base's adversarial examples made once, no augmentation: two processes
    each taking half of every batch must train the same patches as one process (up to summation order)."""
    from safetensors.torch import load_file

    args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--at", "features,block", "--epochs",
            "2", "--steps", "2", "--eps", "0.1", "--batch-size", "16", "--report-budget", "quick", "--eval-samples",
            "15", "--eval-steps", "2", "--quiet", "--adversary", "base", "--subset", "0.6"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert _run([*args, "--out", str(one)]).returncode == 0
    r = _run([*args, "--out", str(two)], procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(one)), load_file(str(two))
    patch = [k for k in a if k.startswith("harden.")]
    assert patch and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in patch)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in patch)  # the patches did train
