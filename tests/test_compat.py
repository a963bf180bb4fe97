"""Issue 21: the models people have — arch specs they write, export formats."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from hardener.cli.app import main
from hardener.errors import InputError
from hardener.model import archspec

from conftest import ARCH, FAST_PATCH, HERE, assert_input_error

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    @classmethod
    def from_config(cls, width=4):
        return cls(width=width)


class Auto:  # a factory that is not a module, like transformers' AutoModel classes
    @classmethod
    def from_config(cls, width=4):
        return Net(width=width)
'''


def test_dotted_callables_build_models(tmp_path):
    f = tmp_path / "zoo.py"
    f.write_text(MODELS)
    for spec in (f"{f}:Net.from_config", f"{f}:Auto.from_config", f"{f}:Net"):
        net = archspec.build(spec, {"width": 5})
        assert isinstance(net, torch.nn.Module) and net.conv.out_channels == 5
    f2 = tmp_path / "zoo2.py"  # walking through an import, or an inherited classmethod, is not a constructor
    f2.write_text(MODELS + "\nimport rich\n\n\nclass Child(Net):\n    pass\n")
    for bad in (f"{f}:Net.__init__", f"{f}:Net._x", f"{f}:Net.from_config.", f"{f}:Nope.x", "os:path.join",
                f"{f2}:rich.print", f"{f2}:torch.load", f"{f2}:Child.from_config", f"{f}:Net.from_config.x",
                f"{f}:Net.forward"):
        with pytest.raises(InputError):
            archspec.build(bad, {})


def test_dotted_callable_through_the_cli(runner, tmp_path):
    f = tmp_path / "zoo.py"
    f.write_text(MODELS)
    from safetensors.torch import save_file

    ck = tmp_path / "net.safetensors"
    save_file(archspec.build(f"{f}:Net", {"width": 6}).state_dict(), str(ck))
    r = runner.invoke(main, ["layers", str(ck), "--arch", f"{f}:Net.from_config", "--arch-kwargs", '{"width": 6}',
                             "--input-shape", "1,8,8"])
    assert r.exit_code == 0, r.output
    assert "conv" in r.stdout
    assert_input_error(runner.invoke(main, ["layers", str(ck), "--arch", f"{f}:Net.__dict__", "--input-shape",
                                            "1,8,8"]), "Class.from_config")


@pytest.fixture(scope="module")
def prefilter_patched(tmp_path_factory, tiny_ckpt, tiny_data):
    """A pre-filter beside a fixer: the pre-filter's hidden layers run channels-last on the CPU."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("pf") / "pf.safetensors"
    r = CliRunner().invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5",
                                  "--at", "prefilter:input,block", "--width", "4", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx"])
@pytest.mark.parametrize("patches", ["fixers", "prefilter"])
def test_export_formats_give_the_patched_logits_in_a_fresh_interpreter(runner, tmp_path, request, patches, fmt):
    patched_ckpt = request.getfixturevalue("patched_ckpt" if patches == "fixers" else "prefilter_patched")
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    from hardener.io import export as X

    target = tmp_path / f"m{X.FORMATS[fmt]}"
    r = runner.invoke(main, ["export", str(patched_ckpt), "--arch", ARCH, "--format", fmt, "--out", str(target)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(target) and "checked in a fresh interpreter" in r.stderr
    # and independently of harden's own check: load it here, on another batch size, against the patched model
    import hardener

    patched = hardener.load(str(patched_ckpt), arch=ARCH).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        want = patched(x)
    if fmt == "torchscript":
        got = torch.jit.load(str(target))(x)
    elif fmt == "export":
        got = torch.export.load(str(target)).module()(x)
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4)


def test_export_onnx_without_the_package_says_how_to_get_it(runner, tmp_path, patched_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    r = runner.invoke(main, ["export", str(patched_ckpt), "--arch", ARCH, "--format", "onnx", "--out",
                             str(tmp_path / "m.onnx")])
    assert_input_error(r, "pip install onnx")
    assert not (tmp_path / "m.onnx").exists()





def test_tuple_of_features_and_logits_needs_logits_index(runner, tmp_path, tiny_test_data):
    from safetensors.torch import save_file

    arch = f"{HERE / 'family_models.py'}:features_and_logits"  # returns (16-d features, 3 logits)
    ck = tmp_path / "m.safetensors"
    save_file(archspec.build(arch, {}).state_dict(), str(ck))
    args = ["eval", str(ck), "--arch", arch, "--data", str(tiny_test_data), "--eps", "0.05", "--steps",
            "1", "--no-checks", "--quiet", "--threat", "whitebox"]
    r = runner.invoke(main, args)
    assert_input_error(r, "--logits INDEX", "[0] (2, 16)", "[1] (2, 3)")
    r = runner.invoke(main, [*args, "--logits", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["models"]["base"]["clean"]["n"] == 45


def test_an_arch_returning_a_compiled_model_is_unwrapped(tmp_path):
    f = tmp_path / "zoo.py"
    f.write_text(MODELS + "\n\ndef compiled(width=4):\n    return torch.compile(Net(width=width))\n")
    net = archspec.build(f"{f}:compiled", {"width": 4})
    assert type(net).__name__ == "Net" and not any(k.startswith("_orig_mod") for k in net.state_dict())


def test_a_checkpoints_own_arch_may_not_name_a_classmethod(tmp_path):
    """Only the user's --arch may be Class.classmethod: a manifest's arch (with --trust-arch) may not."""
    f = tmp_path / "zoo.py"
    f.write_text(MODELS)
    with pytest.raises(InputError, match="pass --arch"):
        archspec.build(f"{f}:Net.from_config", {}, "the checkpoint's arch", allow_dotted=False)
    assert isinstance(archspec.build(f"{f}:Net", {}, "the checkpoint's arch", allow_dotted=False), torch.nn.Module)
