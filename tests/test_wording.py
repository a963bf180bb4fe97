"""Issue 31: one mechanism puts messages in the library's words. Messages are written once, in the command line's
(`--flag`); the library's entry points translate them (`options.wording`): errors, notes, warnings and the notes of
the reports they return. Every flag a message of the library's modules names is one a library keyword answers to, a
phrase the library says otherwise (`wording.PHRASES`), or one only the command line can reach (listed here)."""
from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import hardener
from hardener import api
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.options.wording import PHRASES, python_words

from conftest import ARCH, trained_tiny

# Flags that reach a message of the library's modules only from the command line, each with why.
COMMAND_LINE_ONLY = {
    "resume": "resumable state beside --out: the command line's",
    "state-dir": "harden certify's resumable state", "mlflow": "harden patch/eval --mlflow",
    "fail-under": "harden eval's gates", "allow-weak-gate": "harden eval's gates", "suite": "harden eval's gates",
    "adapt": "harden adaptive", "iterations": "harden adaptive", "neighbour": "harden adaptive",
    "neighbour-steps": "harden adaptive", "post-train": "harden adaptive", "reference-data": "harden adaptive",
    "nproc": "torchrun launches", "format": "harden export", "check": "harden export --no-check",
    "base-cache": "harden eval --base-cache", "parent": "harden eval --parent",
    "crop": "a data option of the command line: named only when it was given",
    "classes": "a data option of the command line: named only when it was given (else PHRASES say it)",
    "preprocessor": "as_patched(preprocessor=) and the command line: named only when it was given",
    "input-shape": "named only when it was given, else PHRASES say it",
    "resize": "named only when it was given, else PHRASES say it",
    "trust-pickle": "PHRASES say it where the library reaches it",
}
PLACEHOLDERS = {"flag", "no-flag", "name-with-dashes", "no-"}  # the wording module's own examples


def _literals(path: Path):
    """Every string literal of a module but its docstrings, implicit concatenations joined, an f-string's fields as 0
    (a number: "--input-shape {c},{h},{w}" reads as the message does), or as nothing where glued to a word."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = ""
            for v in node.values:  # a field after a space or a comma is a value; glued to a name, part of it
                text += v.value if isinstance(v, ast.Constant) else ("0" if text[-1:] in (" ", ",", "") else "")
            yield text
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.value


def test_every_flag_a_library_message_names_has_the_librarys_words():
    aliases = (f.replace("-", "_") for f, k in api.PATCH_ALIASES.items() if k != "report_path")
    keywords = {*api._patch_keywords(), *aliases,
                *api._keywords(api.evaluate), "attack",
                *api._keywords(api.certify), *api._keywords(api.layers), *inspect.signature(hardener.load).parameters}
    root = Path(hardener.__file__).parent
    missing, seen = set(), set()
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts or path.name == "wording.py":  # its literals are the patterns
            continue
        for text in _literals(path):
            for pattern, words in PHRASES:
                text = re.sub(pattern, words, text)
            for m in re.finditer(r"--(no-)?([a-z][a-z0-9-]*)", text):
                flag = m.group(2)
                seen.add(flag)
                if flag.replace("-", "_") not in keywords and flag not in {*COMMAND_LINE_ONLY, "no"} \
                        and m.group(0).lstrip("-") not in PLACEHOLDERS:
                    missing.add(f"{path.relative_to(root)}: {m.group(0)}")
    assert not missing, f"name a keyword, add a PHRASE or list the flag as the command line's: {sorted(missing)}"
    assert not set(COMMAND_LINE_ONLY) - seen, "no message names these any more: drop them from COMMAND_LINE_ONLY"


def test_the_library_says_what_to_do_where_no_keyword_answers_a_flag():
    kw = api._patch_keywords()
    low = ("check --mean/--std (the normalisation the model expects), --input-shape/--resize and the class map "
           "(--classes); pass --allow-low-accuracy to go on")
    assert python_words(low, kw) == ("check mean=/std= (the normalisation the model expects), the input size and the "
                                     "class order of the labels; pass allow_low_accuracy=True to go on")
    assert python_words("holds pickled code: load it only if you trust it, with --trust-pickle", kw) == \
        ("holds pickled code: load it yourself only if you trust it (torch.load(path, weights_only=False)) and pass "
         "the module")
    assert python_words("(see `harden layers`)", kw) == "(see `hardener.layers(model, data)`)"
    assert python_words("use the default recipe (--preset robust)", kw, api.PATCH_ALIASES) == \
        "use the default recipe (recipe='robust')"
    assert python_words("pass --teacher (a checkpoint); use another device (--device)", kw) == \
        "pass teacher= (a checkpoint); use another device (device=)"


@pytest.mark.parametrize("cli, library", [
    ("--loss rslad distils from a robust teacher", "loss='rslad' distils from a robust teacher"),  # a choice
    ("use pgd with --norm L2", "use pgd with norm='L2'"),
    ("pass --select-on N (or --validate N) to watch", "pass select_on=N (or validate=N) to watch"),  # placeholders
    ("give a larger --holdout or --eval-data", "give a larger holdout or eval_data"),  # "or" is no value
    ("held-out images of --data; the base", "held-out images of data; the base"),  # positional: bare
    ("--epochs, --batch-size and --lr", "epochs, batch_size and lr"),
    ("pass --arch yourself", "pass arch= yourself"),
    ("--report-budget 'x': choose quick or full", "report='x': choose quick or full"),
    ("write it beside a --report", "write it beside a --report"),  # the report file has no keyword here
])
def test_flags_become_keywords_by_what_they_say(cli, library):
    assert python_words(cli, api._patch_keywords(), api.PATCH_ALIASES) == library


def test_report_notes_speak_python_in_the_library_and_flags_on_the_command_line(runner, tiny_ckpt, tiny_test_data,
                                                                                 tmp_path):
    """A note the run adds to the report (low-precision attacks) in each face's words."""
    rep = hardener.evaluate(tiny_ckpt, str(tiny_test_data), arch=ARCH, attacks="fgsm", eps=0.1, precision="bf16",
                            checks=False, progress=False)
    notes = rep.data["data"]["warnings"]
    assert any("rerun with precision='fp32'" in n for n in notes) and not any("--" in n for n in notes), notes
    out = tmp_path / "r.json"
    r = runner.invoke(main, ["eval", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_test_data), "--attack", "fgsm",
                             "--eps", "0.1", "--precision", "bf16", "--no-checks", "--quiet", "--report", str(out)])
    assert r.exit_code == 0, r.output
    assert any("rerun with --precision fp32" in n for n in json.loads(out.read_text())["data"]["warnings"])


def test_hardener_layers_is_harden_layers(runner, tiny_ckpt, patched_ckpt):
    """`harden layers` renders the library's table; the library's errors name what to pass, not flags."""
    r = runner.invoke(main, ["layers", str(tiny_ckpt), "--arch", ARCH, "--input-shape", "1,8,8", "--json"])
    assert r.exit_code == 0, r.output
    lay = hardener.layers(tiny_ckpt, (torch.rand(2, 1, 8, 8), torch.tensor([0, 1])), arch=ARCH)
    assert json.loads(r.stdout) == json.loads(json.dumps(lay.to_dict()))
    assert lay.input_shape == (1, 8, 8) and lay.suggested_sites and "sites" in repr(lay)
    assert hardener.layers(patched_ckpt, arch=ARCH).rows  # a patched checkpoint too, as harden layers takes it
    with pytest.raises(InputError, match=r"^cannot tell the model's input shape: pass data$"):
        hardener.layers(trained_tiny(steps=1))
    r = runner.invoke(main, ["layers", str(tiny_ckpt), "--arch", ARCH])
    assert r.exit_code == 2 and "pass --input-shape C,H,W or --data" in r.output


class _DictOut(torch.nn.Module):
    """A model whose output is a dict (a Hugging Face model's is an object of that kind)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"scores": self.net(x), "hidden": x.flatten(1)}


def test_evaluate_certify_and_layers_take_logits_and_say_so():
    """The logits of a dict output are picked with `logits=` in every entry point, which its error names (the
    command line's --logits)."""
    model, x = _DictOut(trained_tiny(steps=1)), torch.rand(6, 1, 8, 8)
    data = (x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(InputError, match="logits=") as e:
        hardener.evaluate(model, data, attacks="fgsm", eps=0.1, checks=False, progress=False)
    assert "--logits" not in str(e.value)
    rep = hardener.evaluate(model, data, attacks="fgsm", eps=0.1, checks=False, threat="whitebox", progress=False,
                            logits="scores")
    assert rep.clean is not None
    assert hardener.layers(model, data, logits="scores").rows
    cert = hardener.certify(model, data, logits="scores", sigma=0.12, n0=10, n=20, max_samples=2, progress=False)
    assert len(cert.rows) == 2
