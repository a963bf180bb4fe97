"""Issue 20: a checkpoint, data file or config file never runs code, lies, or overwrites an input.

Code-execution vectors carry a marker-file payload: the marker must never appear.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hardener
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import tensor_digest

from conftest import ARCH, HERE, assert_input_error

EVIL_MODULE = "import pathlib\npathlib.Path('MARKER').write_text('pwned')\n\ndef net(**kw):\n    pathlib.Path('MARKER').write_text('pwned')\n"


def read_patched(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return json.loads(meta["harden"]), load_file(str(path))


def write_patched(path: Path, manifest, tensors: dict[str, torch.Tensor], redigest: bool = True) -> Path:
    """A crafted patched file; with `redigest`, its checksums are recomputed (as an attacker would)."""
    if redigest and isinstance(manifest, dict):
        manifest = dict(manifest)
        if "tensors_sha256" in manifest:
            manifest["tensors_sha256"] = tensor_digest(tensors)
        if "base_tensors_sha256" in manifest:
            manifest["base_tensors_sha256"] = tensor_digest({k: v for k, v in tensors.items()
                                                             if not k.startswith("harden.")})
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors, str(path), metadata={"harden": text})
    return path


def crafted(tmp_path: Path, patched_ckpt: Path, name: str = "evil.safetensors", **changes) -> Path:
    m, t = read_patched(patched_ckpt)
    m.update(changes)
    return write_patched(tmp_path / name, m, t)


COMMANDS = [
    ("predict", ["--data", "{data}"]),
    ("eval", ["--data", "{data}", "--attack", "fgsm", "--max-samples", "6", "--no-checks"]),
    ("layers", []),
    ("export", ["--out", "{tmp}/x.ts.pt"]),
]


def _run(runner, cmd, f, tmp_path, data, *extra):
    args = [a.format(data=data, tmp=tmp_path) for a in dict(COMMANDS)[cmd]]
    return runner.invoke(main, [cmd, str(f), *args, "--quiet", *extra])


# ---------------------------------------------------------------- code execution


@pytest.mark.parametrize("cmd", [c for c, _ in COMMANDS])
@pytest.mark.parametrize("trust", [[], ["--trust-arch"]])
def test_manifest_arch_os_system_never_runs(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch, cmd, trust):
    monkeypatch.chdir(tmp_path)
    f = crafted(tmp_path, patched_ckpt, arch="os:system", arch_kwargs={"command": "touch MARKER"})
    r = _run(runner, cmd, f, tmp_path, tiny_test_data, *trust)
    assert_input_error(r, "os:system")
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "x.ts.pt").exists()


@pytest.mark.parametrize("arch,kwargs", [
    ("subprocess:run", {"args": ["touch", "MARKER"]}),
    ("subprocess:Popen", {"args": ["touch", "MARKER"]}),
    ("os:popen", {"cmd": "touch MARKER"}),
    ("builtins:exec", {}),
    ("torch.hub:load", {"repo_or_dir": "x", "model": "y"}),
    ("posix:system", {"command": "touch MARKER"}),
])
def test_trusted_prefix_still_refuses_non_constructors(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch,
                                                       arch, kwargs):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARDEN_TRUSTED_ARCH", "os,subprocess,builtins,torch,posix")
    f = crafted(tmp_path, patched_ckpt, arch=arch, arch_kwargs=kwargs)
    r = _run(runner, "predict", f, tmp_path, tiny_test_data)
    assert_input_error(r, arch)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("trust", ["none", "flag", "env"])
def test_module_in_cwd_is_never_imported(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch, trust):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")  # as `python -m` and an interactive session have it
    (tmp_path / "evil.py").write_text(EVIL_MODULE)
    f = crafted(tmp_path, patched_ckpt, arch="evil:net")
    extra = ["--trust-arch"] if trust == "flag" else []
    if trust == "env":
        monkeypatch.setenv("HARDEN_TRUSTED_ARCH", "evil")
    r = _run(runner, "predict", f, tmp_path, tiny_test_data, *extra)
    assert_input_error(r, "evil")
    assert not (tmp_path / "MARKER").exists()
    sys.modules.pop("evil", None)


@pytest.mark.parametrize("arch", ["evil.py:net", "./evil.py:net", "sub/../evil.py:net"])
def test_relative_file_arch_in_manifest_is_never_imported_even_trusted(runner, tmp_path, patched_ckpt,
                                                                        tiny_test_data, monkeypatch, arch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(EVIL_MODULE)
    (tmp_path / "sub").mkdir()
    f = crafted(tmp_path, patched_ckpt, arch=arch)
    r = _run(runner, "predict", f, tmp_path, tiny_test_data, "--trust-arch")
    assert_input_error(r, "relative file path")
    assert not (tmp_path / "MARKER").exists()


def test_library_load_never_runs_manifest_code(tmp_path, patched_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(EVIL_MODULE)
    for arch, kwargs in (("os:system", {"command": "touch MARKER"}), ("evil:net", {})):
        f = crafted(tmp_path, patched_ckpt, arch=arch, arch_kwargs=kwargs)
        for trust in (False, True, "os,evil"):
            with pytest.raises(InputError):
                hardener.load(f, trust_arch=trust)
    assert not (tmp_path / "MARKER").exists()
    sys.modules.pop("evil", None)


def test_python_dash_m_ignores_modules_in_cwd(tmp_path, patched_ckpt, tiny_test_data):
    """`python -m hardener` starts with the current directory on sys.path; harden drops it."""
    (tmp_path / "evil.py").write_text(EVIL_MODULE)
    (tmp_path / "safetensors.py").write_text(EVIL_MODULE)  # imported lazily by harden
    f = crafted(tmp_path, patched_ckpt, arch="evil:net")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(hardener.__file__).parent.parent),
           "HARDEN_TRUSTED_ARCH": "evil"}
    r = subprocess.run([sys.executable, "-m", "hardener", "predict", str(f), "--data", str(tiny_test_data)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "MARKER").exists()


def test_user_arch_uses_user_kwargs_not_the_manifests(runner, tmp_path, patched_ckpt, tiny_test_data):
    # the manifest asks for width 8; the tensors are width 4: the user's --arch with no --arch-kwargs
    # builds the default (width 4) -- the manifest's kwargs are not fed to the constructor
    f = crafted(tmp_path, patched_ckpt, arch_kwargs={"width": 8})
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--trust-arch", "--data", str(tiny_test_data),
                             "--quiet"])
    assert_input_error(r, "shape")


def test_file_arch_in_manifest_needs_the_user(runner, tmp_path, patched_ckpt, tiny_test_data):
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "--arch", "--trust-arch")


def test_module_arch_in_manifest_is_used_when_its_prefix_is_trusted(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                                    monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    f = crafted(tmp_path, patched_ckpt, arch="tiny_model:tiny")
    r = runner.invoke(main, ["predict", str(f), "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "HARDEN_TRUSTED_ARCH")
    monkeypatch.setenv("HARDEN_TRUSTED_ARCH", "tiny_mod")  # a prefix of the name, not of the module path
    r = runner.invoke(main, ["predict", str(f), "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 2
    monkeypatch.setenv("HARDEN_TRUSTED_ARCH", "other, tiny_model")
    r = runner.invoke(main, ["predict", str(f), "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("key", ["trust_pickle", "trust-arch", "force", "[eval]\ntrust_pickle",
                                 "[patch]\ntrust-arch"])
def test_config_file_cannot_switch_on_trust(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "harden.toml").write_text(f"{key} = true\n")
    key = key.splitlines()[-1]
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--arch", ARCH, "--data", str(tiny_test_data)])
    assert_input_error(r, key, "command line")


def test_config_file_in_cwd_is_announced(runner, tmp_path, patched_ckpt, tiny_test_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "harden.toml").write_text(f'arch = "{ARCH}"\n')
    r = runner.invoke(main, ["predict", str(patched_ckpt), "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "harden.toml" in r.stderr and "working directory" in r.stderr


# ---------------------------------------------------------------- crafted manifests


def _mutate(m: dict, t: dict, case: str):
    p0 = m["patches"][0]
    if case == "not_json":
        return "{not json", t
    if case == "list":
        return "[]", t
    if case == "no_site":
        del p0["site"]
    elif case == "dunder_site":
        p0["site"] = "__class__"
    elif case == "missing_site":
        p0["site"] = "layer9"
    elif case == "rho_string":
        p0["rho"] = "4"
    elif case == "patches_string":
        m["patches"] = "fixer"
    elif case == "format_string":
        m["format_version"] = "1"
    elif case == "arch_int":
        m["arch"] = 5
    elif case == "tensor_missing":
        t = {k: v for k, v in t.items() if k != "harden.features.conv1.weight"}
    elif case == "tensor_shape":
        t = {**t, "harden.features.conv1.weight": torch.zeros(3, 8, 1, 1)}
    elif case == "huge":
        p0["channels"] = 10 ** 7
    elif case == "huge_rho":
        p0["rho"] = 1e-9
    elif case == "big_but_valid_fields":
        p0["channels"], p0["rho"] = 65536, 1.0
    elif case == "act_list":
        p0["act"] = ["linear"]
    elif case == "kind_object":
        p0["kind"] = {"fixer": 1}
    elif case == "unknown_kind":
        p0["kind"] = "rootkit"
    elif case == "unknown_key":
        p0["exec"] = "rm -rf /"
    elif case == "nan_patch":
        t = {**t, "harden.block.conv2.weight": torch.full_like(t["harden.block.conv2.weight"], float("nan"))}
    elif case == "extra_tensor":
        t = {**t, "harden.elsewhere.w": torch.zeros(3)}
    elif case == "input_not_object":
        m["input"] = [1, 8, 8]
    elif case == "std_zero":
        m["input"]["std"] = [0.0]
    elif case == "route":
        m["route"] = "sideways"
    elif case == "dup_site":
        m["patches"][1]["site"] = p0["site"]
    elif case == "prefilter_mid":
        m["patches"][0] = {"kind": "prefilter", "site": "features", "channels": 1, "width": 2, "delta": 1.0}
    elif case == "auxbn_on_conv":
        m["patches"][0] = {"kind": "auxbn", "site": "features.0", "type": "BatchNorm2d", "features": 4,
                           "eps": 1e-5, "momentum": 0.1, "affine": True}
    return m, t


@pytest.mark.parametrize("case,needle", [
    ("not_json", "not valid json"), ("list", "json object"), ("no_site", "patches[0].site"),
    ("dunder_site", "__class__"), ("missing_site", "layer9"), ("rho_string", "patches[0].rho"),
    ("patches_string", "patches"), ("format_string", "format_version"), ("arch_int", "arch"),
    ("tensor_missing", "harden.features.conv1.weight"), ("tensor_shape", "shape"), ("huge", "patches[0].channels"),
    ("huge_rho", "rho"), ("big_but_valid_fields", "file holds"), ("unknown_kind", "patches[0].kind"),
    ("unknown_key", "patches[0].exec"), ("nan_patch", "nan"), ("extra_tensor", "harden.elsewhere.w"),
    ("input_not_object", "input"), ("std_zero", "input.std"), ("route", "route"), ("dup_site", "two patches"),
    ("prefilter_mid", "input"), ("auxbn_on_conv", "batchnorm"), ("act_list", "patches[0].act"),
    ("kind_object", "patches[0].kind"),
])
def test_crafted_manifest_is_one_error_line(runner, tmp_path, patched_ckpt, tiny_test_data, case, needle):
    m, t = read_patched(patched_ckpt)
    m, t = _mutate(m, t, case)
    f = write_patched(tmp_path / "crafted.safetensors", m, t)
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, needle)


def test_checksum_covers_patch_tensors(runner, tmp_path, patched_ckpt, tiny_test_data):
    m, t = read_patched(patched_ckpt)
    t["harden.block.conv2.weight"] = t["harden.block.conv2.weight"] + 0.5
    f = write_patched(tmp_path / "t.safetensors", m, t, redigest=False)
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "checksum")


def test_older_files_without_the_new_digest_still_load(runner, tmp_path, patched_ckpt, tiny_test_data):
    m, t = read_patched(patched_ckpt)
    del m["tensors_sha256"]
    f = write_patched(tmp_path / "old.safetensors", m, t, redigest=False)
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 0, r.output
    t["block.0.bias"] = t["block.0.bias"] + 1  # what they have (the base digest) is still verified
    f = write_patched(tmp_path / "old2.safetensors", m, t, redigest=False)
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "checksum")


def test_nan_patch_weights_never_look_robust(runner, tmp_path, patched_ckpt, tiny_test_data):
    """The issue: NaN patches loaded with exit 0 and eval reported them more robust than the base."""
    m, t = read_patched(patched_ckpt)
    t = {k: (torch.full_like(v, float("nan")) if k.startswith("harden.") and v.is_floating_point() else v)
         for k, v in t.items()}
    f = write_patched(tmp_path / "nan.safetensors", m, t)
    r = runner.invoke(main, ["eval", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm",
                             "--quiet", "--no-checks"])
    assert_input_error(r, "nan")
