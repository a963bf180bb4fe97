"""Issue 35, item 0: the trust checks come before any import; a trusted constructor never ends the process.

Payloads are harmless stand-ins: a module that would write MARKER when imported or called.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hardener
from hardener.cli.app import main
from hardener.errors import HardenError, InputError
from hardener.io.checkpoint import tensor_digest
from hardener.model import archspec

from conftest import ARCH, assert_input_error

PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n\ndef net(**kw):\n" \
          "    pathlib.Path({marker!r}).write_text('ran')\n"


def with_arch(tmp_path: Path, patched_ckpt: Path, arch: str, name: str = "crafted.safetensors") -> Path:
    """A copy of the patched checkpoint whose manifest names `arch` (checksums recomputed, as an attacker would)."""
    with safe_open(str(patched_ckpt), framework="pt") as f:
        m = json.loads(f.metadata()["harden"])
    t = load_file(str(patched_ckpt))
    m["arch"], m["arch_kwargs"] = arch, {}
    m["tensors_sha256"] = tensor_digest(t)
    save_file(t, str(tmp_path / name), metadata={"harden": json.dumps(m)})
    return tmp_path / name


@pytest.fixture()
def evil_cwd(tmp_path, monkeypatch) -> Path:
    """A working directory holding evil.py and test_evil.py (what unittest discovery would import)."""
    work = tmp_path / "work"
    work.mkdir()
    marker = str(work / "MARKER")
    (work / "evil.py").write_text(PAYLOAD.format(marker=marker))
    (work / "test_evil.py").write_text(PAYLOAD.format(marker=marker))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("arch", ["antigravity:geohash", "this:s", "unittest.__main__:main",
                                  "torch.__main__:net", "pip.__main__:net",
                                  "__hello__:main", "__phello__.spam:main"])  # frozen in, not in stdlib_module_names
def test_denied_module_is_refused_before_import_even_trusted(tmp_path, patched_ckpt, evil_cwd, capfd, arch):
    module = arch.split(":")[0]
    loaded = module in sys.modules
    f = with_arch(tmp_path, patched_ckpt, arch)
    for trust in (True, module.split(".")[0]):
        with pytest.raises(InputError, match="never imports|entry point"):
            hardener.load(f, trust_arch=trust)
    assert (module in sys.modules) == loaded  # never imported
    assert capfd.readouterr().out == ""  # `this` prints the Zen of Python when imported
    assert not (evil_cwd / "MARKER").exists()


@pytest.mark.parametrize("via", ["proc", "proc_pid", "symlink_file", "symlink_dir", "dev_fd"])
def test_stored_path_through_the_process_is_refused_even_trusted(runner, tmp_path, patched_ckpt, tiny_test_data,
                                                                 evil_cwd, via):
    links = tmp_path / "links"
    links.mkdir()
    if via == "proc":
        arch = "/proc/self/cwd/evil.py:net"
    elif via == "proc_pid":
        arch = f"/proc/{os.getpid()}/cwd/evil.py:net"
    elif via == "symlink_file":  # an innocent-looking absolute path, linked to the reader's working directory
        (links / "model.py").symlink_to("/proc/self/cwd/evil.py")
        arch = f"{links / 'model.py'}:net"
    elif via == "symlink_dir":  # a relative link to a folder that is itself a process path
        (links / "cwd").symlink_to("/proc/self/cwd")
        (links / "pkg").symlink_to("cwd")
        arch = f"{links / 'pkg' / 'evil.py'}:net"
    else:
        arch = "/dev/fd/0:net"
    f = with_arch(tmp_path, patched_ckpt, arch)
    with pytest.raises(InputError, match="depends on the reading process"):
        hardener.load(f, trust_arch=True)
    r = runner.invoke(main, ["predict", str(f), "--data", str(tiny_test_data), "--trust-arch", "--quiet"])
    assert_input_error(r, "goes through")
    assert not (evil_cwd / "MARKER").exists()


def test_stored_absolute_path_and_plain_symlink_still_load_when_trusted(tmp_path, patched_ckpt):
    (tmp_path / "model.py").symlink_to(Path(ARCH.rsplit(":", 1)[0]))  # a link that names a file, not the process
    for arch in (ARCH, f"{tmp_path / 'model.py'}:tiny"):
        m = hardener.load(with_arch(tmp_path, patched_ckpt, arch), trust_arch=True)
        assert m.manifest.arch == arch


def test_symlink_loop_is_one_error(tmp_path, patched_ckpt):
    (tmp_path / "a.py").symlink_to(tmp_path / "b.py")
    (tmp_path / "b.py").symlink_to(tmp_path / "a.py")
    with pytest.raises(InputError, match="loop"):
        hardener.load(with_arch(tmp_path, patched_ckpt, f"{tmp_path / 'a.py'}:net"), trust_arch=True)


EXITS = {
    "call": "import sys\n\ndef net(**kw):\n    sys.exit(0)\n",
    "import": "raise SystemExit(4)\n\ndef net(**kw):\n    pass\n",
    "quit": "def net(**kw):\n    raise SystemExit('bye')\n",
    "base": "class Stop(BaseException):\n    pass\n\n\ndef net(**kw):\n    raise Stop('bye')\n",  # SystemExit's kin
    "importbase": "raise GeneratorExit('bye')\n\ndef net(**kw):\n    pass\n",
}


@pytest.mark.parametrize("case", sorted(EXITS))
@pytest.mark.parametrize("by", ["file", "module"])
def test_trusted_constructor_that_exits_is_an_error(tmp_path, patched_ckpt, tiny_ckpt, monkeypatch, case, by):
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    name = f"exits_{case}_{by}"
    (pkg / f"{name}.py").write_text(EXITS[case])
    monkeypatch.syspath_prepend(str(pkg))
    arch = f"{pkg / name}.py:net" if by == "file" else f"{name}:net"
    raised = {"base": "Stop", "importbase": "GeneratorExit"}.get(case, "SystemExit")
    with pytest.raises(HardenError, match=raised) as e:
        hardener.load(with_arch(tmp_path, patched_ckpt, arch), trust_arch=True)
    assert e.value.exit_code == 2
    with pytest.raises(HardenError, match=raised):  # the user's own --arch for a plain checkpoint
        hardener.load(tiny_ckpt, arch=arch)
    sys.modules.pop(name, None)


def test_manifest_arch_with_a_newline_cannot_forge_output(runner, tmp_path, patched_ckpt, tiny_test_data):
    f = with_arch(tmp_path, patched_ckpt, "pkg.mod:net\nError: forged second line")
    r = runner.invoke(main, ["predict", str(f), "--data", str(tiny_test_data), "--quiet"])
    assert_input_error(r, "control characters")
    r = runner.invoke(main, ["predict", str(f), "--arch", ARCH, "--data", str(tiny_test_data), "--quiet"])
    assert r.exit_code == 0, r.output  # the user's own --arch does not need the damaged field


def test_denied_module_check_is_by_name_only():
    assert archspec.denied_module("antigravity") and archspec.denied_module("mypkg.__main__")
    assert archspec.denied_module("torch.nn") is None  # already loaded: its classes are only looked up
    assert archspec.denied_module("torchvision.models") is None
    assert archspec.denied_module("__hello__")  # frozen into the interpreter
