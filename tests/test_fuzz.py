"""Fuzz the boundaries (issue 20): mutated manifests of a real patched file, data files, option values; and
(issue 35) data, state, cache and adversarial-example files with flipped bytes or cut short.

Properties for every example: the exit code is 0, 2 or 3 (never an unhandled exception), no traceback,
no new files besides the declared outputs, the inputs unchanged, and no payload ran. Derandomized and
small: the whole file runs in well under a minute.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_security import read_patched

from hardener.cli.app import main

from conftest import ARCH

FUZZ = settings(derandomize=True, max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10 ** 7, 2 ** 62, -2 ** 40]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["os:system", "subprocess:run", "evil:net", "__class__", "input", "features", "block",
                     "features.0", "head.3", "../../etc/passwd", "fixer", "auxbn", "prefilter", "denoise",
                     "BatchNorm2d", "touch MARKER"]),
    st.lists(st.integers(-2, 10), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"


@contextmanager
def sandbox():
    """A fresh working directory (cwd) holding an evil.py; yields it; the cwd is restored afterwards."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        Path(d, "evil.py").write_text("import pathlib\npathlib.Path('MARKER').write_text('x')\n"
                                      "def net(**kw):\n    pathlib.Path('MARKER').write_text('x')\n")
        try:
            yield Path(d)
        finally:
            os.chdir(old)


def check(result, root: Path, before: set[str], inputs: dict[Path, str], allowed: set[str] = frozenset()) -> None:
    assert result.exit_code in (0, 2, 3), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert not (root / "MARKER").exists(), "payload ran"
    new = {p.name for p in root.iterdir()} - before - set(allowed)
    assert not new, new
    for p, d in inputs.items():
        assert _digest(p) == d, f"input {p} changed"


def _paths(obj, prefix=()):
    """Every JSON path of a manifest (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(m, path, op, value):
    if not path:
        return value if op == "replace" else m
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"x{last}"] = value
    else:
        parent[last] = value
    return m


@FUZZ
@given(data=st.data(), op=st.sampled_from(["replace", "replace", "delete", "add"]), value=HOSTILE_VALUES,
       redigest=st.booleans(), user_arch=st.booleans(), trust=st.booleans())
def test_fuzz_manifest(patched_ckpt, tiny_test_data, data, op, value, redigest, user_arch, trust):
    from hardener.io.checkpoint import tensor_digest

    m, t = read_patched(patched_ckpt)
    m["training"] = {}  # keep the path space on the fields harden interprets
    paths = [p for p in _paths(m)]
    path = data.draw(st.sampled_from(paths), label="path")
    m = _mutate(m, path, op, value)
    if redigest and isinstance(m, dict):
        if isinstance(m.get("tensors_sha256"), str):
            m["tensors_sha256"] = tensor_digest(t)
    inputs = {patched_ckpt: _digest(patched_ckpt), tiny_test_data: _digest(tiny_test_data)}
    with sandbox() as root:
        f = root / "crafted.safetensors"
        save_file(t, str(f), metadata={"harden": json.dumps(m)})
        inputs[f] = _digest(f)
        before = {p.name for p in root.iterdir()}
        args = ["predict", str(f), "--data", str(tiny_test_data), "--quiet"]
        args += ["--arch", ARCH] if user_arch else []
        args += ["--trust-arch"] if trust else []
        from click.testing import CliRunner

        r = CliRunner().invoke(main, args)
        check(r, root, before, inputs)


def _data_file(root: Path, kind: str, n: int, shape, dtype: str, label_kind: str, junk: bytes) -> Path:
    f = root / f"d.{'npz' if kind in ('npz', 'junk', 'truncated') else kind}"
    rng = np.random.default_rng(n)
    if kind == "junk":
        f.write_bytes(junk)
        return f
    images = (rng.random((n, *shape)) * (255 if dtype == "uint8" else 1.5)).astype(dtype)
    labels = {"int": rng.integers(-1, 5, n), "str": np.array([str(i) for i in range(n)]),
              "float": rng.random(n), "short": rng.integers(0, 3, max(0, n - 1)),
              "2d": rng.integers(0, 3, (n, 2))}[label_kind]
    if kind == "pt":
        torch.save({"images": torch.from_numpy(np.ascontiguousarray(images)),
                    "labels": torch.from_numpy(np.asarray(labels)) if label_kind != "str" else list(labels)}, f)
    elif kind == "safetensors":
        save_file({"images": torch.from_numpy(np.ascontiguousarray(images)).contiguous()}, str(f))
    else:
        np.savez(f, images=images, labels=labels)
        if kind == "truncated":
            f.write_bytes(f.read_bytes()[: max(1, len(f.read_bytes()) // 2)])
    return f


@FUZZ
@given(kind=st.sampled_from(["npz", "pt", "safetensors", "junk", "truncated"]), n=st.integers(0, 6),
       shape=st.sampled_from([(1, 8, 8), (8, 8, 1), (3, 8, 8), (8, 8), (1, 4, 4), (2, 1, 8, 8), (0, 8, 8)]),
       dtype=st.sampled_from(["uint8", "float32", "float64", "int16", "bool", "float16"]),
       label_kind=st.sampled_from(["int", "str", "float", "short", "2d"]), junk=st.binary(max_size=64),
       resize=st.sampled_from([None] * 8 + ["8,8", "0,8", "99999999,2"]))
def test_fuzz_data_file(patched_ckpt, kind, n, shape, dtype, label_kind, junk, resize):
    from click.testing import CliRunner

    with sandbox() as root:
        f = _data_file(root, kind, n, shape, dtype, label_kind, junk)
        inputs = {patched_ckpt: _digest(patched_ckpt), f: _digest(f)}
        before = {p.name for p in root.iterdir()}
        args = ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(f), "--quiet"]
        args += ["--resize", resize] if resize else []
        r = CliRunner().invoke(main, args)
        check(r, root, before, inputs)


NUMBERS = st.one_of(st.integers(-3, 3), st.sampled_from(["nan", "inf", "-inf", "1e30", "-0", "0.5", "x", "",
                                                           "1e-320", "3,3", "-1,-1"]))
EVAL_FLAGS = ["--batch-size", "--steps", "--restarts", "--queries", "--max-samples", "--eps", "--resize",
              "--crop", "--subset", "--seed", "--fail-under", "--eps-sweep"]
PATCH_FLAGS = ["--lr", "--steps", "--epochs", "--batch-size", "--rho", "--delta", "--width", "--beta", "--lam",
               "--mu", "--gamma", "--eps-warmup", "--eval-samples", "--eval-steps", "--save-every", "--alpha",
               "--phi", "--sigma", "--validate-every", "--subset", "--eps", "--cache-limit"]


@settings(derandomize=True, max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cmd=st.sampled_from(["eval", "predict", "patch"]), data=st.data(), value=NUMBERS)
def test_fuzz_option_values(tiny_ckpt, patched_ckpt, tiny_data, cmd, data, value):
    from click.testing import CliRunner

    flags = {"eval": EVAL_FLAGS, "predict": ["--max-samples", "--resize", "--crop", "--seed"],
             "patch": PATCH_FLAGS}[cmd]
    flag = data.draw(st.sampled_from(flags), label="flag")
    with sandbox() as root:
        inputs = {tiny_ckpt: _digest(tiny_ckpt), patched_ckpt: _digest(patched_ckpt), tiny_data: _digest(tiny_data)}
        before = {p.name for p in root.iterdir()}
        if cmd == "patch":  # bounded: 1 epoch of tiny steps; a fuzzed value may only shrink it
            args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--out", "o.safetensors",
                    "--epochs", "1", "--steps", "1", "--eval-samples", "6", "--eval-steps", "1", "--subset", "12",
                    "--batch-size", "16", "--quiet", "--no-cache"]
            allowed = {"o.safetensors"}
        else:
            args = [cmd, str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--quiet"]
            if cmd == "eval":
                args += ["--attack", "fgsm", "--no-checks", "--max-samples", "6"]
            allowed = set()
        if flag in ("--epochs", "--steps", "--eval-steps", "--restarts") and str(value).lstrip("-").isdigit():
            value = min(int(value), 2)
        r = CliRunner().invoke(main, args + [flag, str(value)])
        check(r, root, before, inputs, allowed)


# ---------------------------------------------------------------- damaged files (issue 35, item 7)

def _damage(blob: bytes, how: str, seed: int) -> bytes:
    """`blob` with a few bytes flipped, or cut short, at seeded positions."""
    rng = np.random.default_rng(seed)
    if how == "truncate":
        return blob[: int(rng.integers(0, len(blob)))]
    b = bytearray(blob)
    for pos in rng.integers(0, len(b), int(rng.integers(1, 4))):
        b[pos] ^= int(rng.integers(1, 256))
    return bytes(b)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """One valid data file of each format harden reads (an IDX pair as fashion-mnist's layout)."""
    import gzip

    d = tmp_path_factory.mktemp("fuzzdata")
    rng = np.random.default_rng(0)
    images, labels = (rng.random((12, 1, 8, 8)) * 255).astype(np.uint8), rng.integers(0, 3, 12)
    np.savez(d / "d.npz", images=images, labels=labels)
    torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, d / "d.pt")
    save_file({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, str(d / "d.safetensors"))
    (d / "fm").mkdir()
    (d / "fm" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + (12).to_bytes(4, "big")
                                                       + (8).to_bytes(4, "big") * 2 + images.tobytes())
    (d / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + (12).to_bytes(4, "big")
                                                                        + labels.astype(np.uint8).tobytes()))
    return {"npz": d / "d.npz", "pt": d / "d.pt", "safetensors": d / "d.safetensors",
            "idx": d / "fm" / "train-images-idx3-ubyte", "idx.gz": d / "fm" / "train-labels-idx1-ubyte.gz"}


@settings(derandomize=True, max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["npz", "pt", "safetensors", "idx", "idx.gz"]),
       how=st.sampled_from(["flip", "truncate"]), seed=st.integers(0, 2 ** 16))
def test_fuzz_damaged_data_files(patched_ckpt, data_files, kind, how, seed):
    """A data file with flipped bytes or cut short: read (a flipped pixel is still a picture), or exit 2 or 3 with
    one line; never a traceback."""
    from click.testing import CliRunner

    src = data_files[kind]
    with sandbox() as root:
        folder = root / "fm"
        if kind.startswith("idx"):
            shutil.copytree(src.parent, folder)
            f, spec = folder / src.name, "fashion-mnist:train"
        else:
            f = root / src.name
            spec = str(f)
        f.write_bytes(_damage(src.read_bytes(), how, seed))
        env = {"HARDEN_FASHION_MNIST_DIR": str(folder)}
        r = CliRunner(env=env).invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", spec, "--quiet"])
        _one_line_or_ok(r)


def _one_line_or_ok(r) -> None:
    assert r.exit_code in (0, 2, 3), (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    if r.exit_code:
        assert len([line for line in r.output.splitlines() if line.startswith("Error:")]) == 1, r.output


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> dict:
    """Files harden writes for itself, each with the call that reads it back: a training state, an evaluation
    state, saved adversarial examples, a spilled array with its tag, a --base-cache entry and transfer batch."""
    from hardener.evaluation import threats as E
    from hardener.io.resume import EvalStore, Saver

    from conftest import trained_tiny

    d = tmp_path_factory.mktemp("own")
    saver = Saver(d / "o.partial", fingerprint="fp")
    saver.save({"model": {"w": torch.randn(4, 4)}, "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}},
                "epoch": 1, "step": 0, "logs": [{"loss": 0.5}], "perm": torch.randperm(12), "best": None})
    saver.save_adv(torch.rand(12, 1, 8, 8))
    np.save(saver.spill_path, np.random.default_rng(1).random((12, 1, 8, 8)).astype(np.float16))
    saver.mark_spill_done()
    store = EvalStore(d / "e.partial", "fp", resume=False)
    store.put("whitebox/0:pgd", {"robust": torch.ones(12, dtype=torch.bool), "row": None, "k": 1}, force=True)
    net = trained_tiny().eval()
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    cfg = E.EvalConfig(attacks=["fgsm"], eps=0.1, batch_size=8)
    cache = E.BaseCache(d / "bc", net, net.state_dict(), x, "data", cfg, torch.device("cpu"))
    cache.save_base({"_masks": {"clean": torch.ones(12, dtype=torch.bool)}, "clean": 1.0, "rows": [1, "a", None]})
    bank = E.TransferBank(net, x, y, 8, torch.device("cpu"), cache.dir, cfg, cache.key)
    spec = E._spec(cfg, "fgsm", 3)
    bank._batch("0:fgsm", spec, 0)

    def transfer():
        return E.TransferBank(net, x, y, 8, torch.device("cpu"), cache.dir, cfg, cache.key)._batch("0:fgsm", spec, 0)
    return {"state": (saver.path, lambda: Saver(saver.path, "fp", resume=True).load()),
            "eval-state": (d / "e.partial", lambda: EvalStore(d / "e.partial", "fp", resume=True).data),
            "adv": (saver.adv_path, saver.load_adv),
            "spill": (saver.spill_path, saver.spill_done),
            "spill-tag": (saver.spill_path.with_name(saver.spill_path.name + ".done"), saver.spill_done),
            "cache-base": (cache.dir / "base.pt", cache.load_base),
            "cache-transfer": (next(cache.dir.glob("transfer-*")), transfer)}


@settings(derandomize=True, max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(["state", "eval-state", "adv", "spill", "spill-tag", "cache-base", "cache-transfer"]),
       how=st.sampled_from(["flip", "truncate"]), seed=st.integers(0, 2 ** 16))
def test_fuzz_damaged_state_and_cache_files(own_files, kind, how, seed):
    """A state, cache or adversarial-example file with flipped bytes or cut short: one-line InputError (exit 2)
    naming the file, or -- where the damage missed every byte that holds content (zip padding) -- the very same
    content; never an unhandled exception, never different numbers."""
    from hardener.errors import InputError
    from hardener.io import integrity as I

    path, read = own_files[kind]
    good = path.read_bytes()
    want = read()
    try:
        path.write_bytes(_damage(good, how, seed))
        try:
            got = read()
        except InputError as e:
            assert str(path).removesuffix(".done") in str(e) and "\n" not in str(e), str(e)
        else:
            assert I.digest("", got) == I.digest("", want), "damaged content was used"
    finally:
        path.write_bytes(good)
