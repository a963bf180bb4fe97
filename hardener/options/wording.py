"""The library speaks Python: an error raised under `speaking_python(keywords)` names keywords (`device='cpu'`,
`trust_arch=True`, `teacher=`, `raise epochs`), not the command line's flags (`--device cpu`, `--trust-arch`,
`--teacher`, `raise --epochs`). Messages are written once, in the command line's words, and this is the one place
that turns them into the library's: the library's entry points (`hardener.patch`, `.evaluate`, `.certify`, `.load`,
`.layers`) translate their errors, their notes and warnings, and the notes of the reports they return. A flag their
keywords answer to becomes the keyword; the few flags of the data and model options that no keyword answers to
(`--resize`, `--classes`, `--trust-pickle`, ...) and `harden layers` become what a library caller does instead
(PHRASES); any other flag (a command line's own: `--out`, `--resume`) stays as it is."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from ..errors import HardenError
from .choices import (
    ACTIVATIONS,
    ADVERSARY_CHOICES,
    DENOISE_OPS,
    LOSSES,
    NORMS,
    PRECISIONS,
    PREFILTER_DESIGNS,
    PRESETS,
    REPORT_BUDGETS,
)

LITERALS = frozenset({"cpu", "cuda", "auto", "mps", "none", "all"})  # bare values that follow a flag: quoted
# The values a keyword takes, where they are a fixed set: after its flag such a word is its value, whatever follows
# ("--loss rslad distils ..." is loss='rslad'); another word is its value only where the phrase ends there.
CHOICES = {"loss": LOSSES, "loss_name": LOSSES, "norm": NORMS, "precision": PRECISIONS,
           "adversary": ADVERSARY_CHOICES, "prefilter_design": PREFILTER_DESIGNS, "denoise": DENOISE_OPS,
           "denoise_op": DENOISE_OPS, "activation": ACTIVATIONS, "report": REPORT_BUDGETS, "recipe": PRESETS}
STOP = frozenset("a an and are as at but by for from if in is it itself not of on only or that the to too was when "
                 "where which with yourself must also again instead first".split())  # never a flag's value
POSITIONAL = frozenset({"model", "data"})  # the entry points' first arguments: named bare
QUANTITY = re.compile(r"\b(raise|lower|smaller|larger|higher|fewer|more)\s+$")  # "raise epochs": a bare keyword
ASK = re.compile(r"(\b(pass|give|use|with|drop|set|check|to)\s+|[(/])$")  # "pass teacher=", "(device=)", "mean=/std="
# What a library caller does where a message names a data or model option that no library keyword answers to (the
# library takes tensors, datasets and modules it does not decode, resize or unpickle): (pattern, the library's words).
PHRASES = (
    (r"--input-shape/--resize", "the input size"),
    (r"\(check --input-shape, --resize or the data\)", "(check the data's input size)"),
    (r"pass --input-shape C,H,W or --data", "pass data"),
    (r"pass --input-shape (\d+),(\d+),(\d+) to convert them", r"give images of shape (\1, \2, \3)"),
    (r"pass --resize (H,W|\d+,\d+)", r"resize the images to \1"),
    (r"give images of the model's input size, or --resize", "give images of the model's input size"),
    (r"the class map \(--classes\)", "the class order of the labels"),
    (r"map classes with --classes", "map the labels to the model's class indices"),
    (r"map them with --classes", "map the labels to the model's class indices"),
    (r"load it only if you trust it, with --trust-pickle", "load it yourself only if you trust it "
     "(torch.load(path, weights_only=False)) and pass the module"),
    (r"that file with --trust-pickle", "that module"),
    (r"`harden layers`", "`hardener.layers(model, data)`"),
    (r"\(harden eval\)", "(hardener.evaluate)"),
    (r" \(or --restarts\)", ""),  # hardener.evaluate has no restarts: raise steps
)
FLAG = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ('[^']*'|\"[^\"]*\"|\d[\d./e+-]*(?<![./e+-])"
                  r"|[a-z][a-z0-9-]*(?:,[a-z0-9-]+)*|[A-Z][A-Za-z0-9]*(?:[|,][A-Za-z0-9]+)*))?")


def python_words(text: str, keywords: dict[str, Any], aliases: dict[str, str] | None = None) -> str:
    """`text` with each `--flag [value]` whose keyword (dashes as underscores, or `aliases[...]`) is in `keywords`
    (name -> default) written as a keyword: `flag=value` for a quoted value, a number, an upper-case placeholder
    (`select_on=N`), one of the keyword's CHOICES or of LITERALS, or a word that ends the phrase after a flag whose
    default is text (quoted); `flag=True` (`False` for `--no-flag`) for a flag whose default is False; otherwise the
    bare keyword (the subject of a sentence, "raise epochs", "of data"), or `flag=` where the text asks for it ("pass
    teacher=", "(device=)"). PHRASES first."""
    aliases = aliases or {}
    for pattern, words in PHRASES:
        text = re.sub(pattern, words, text)

    def sub(m: re.Match) -> str:
        neg, flag, value = m.groups()
        key = aliases.get(flag, flag.replace("-", "_"))
        if key not in keywords:
            return m.group(0)
        if neg:
            return f"{key}=False{f' {value}' if value else ''}"
        if value and (value[0] in "'\"" or value[0].isdigit()):
            return f"{key}={value}"
        if value in CHOICES.get(key, ()) or value in LITERALS:
            return f"{key}={value!r}"
        if value and value[0].isupper():
            return f"{key}={value}"  # a placeholder: N, KEY|INDEX, C,H,W
        if value and value not in STOP and isinstance(keywords[key], str) and not _prose(m):
            return f"{key}={value!r}"  # a word that ends a phrase after a text option: its value
        rest = f" {value}" if value else ""
        if keywords[key] is False:
            return f"{key}=True{rest}"
        before = m.string[:m.start()]
        if key not in POSITIONAL and not QUANTITY.search(before) and ASK.search(before):
            return f"{key}={rest}"
        return f"{key}{rest}"

    return FLAG.sub(sub, text)


def _prose(m: re.Match) -> bool:
    """The word after the flag goes on as a sentence ("--eps must be ..."), rather than ending there as a value
    ("--loss rslad: ...", "(--method fixer,auxbn)")."""
    return bool(re.match(r" [a-z]", m.string[m.end():]))


@contextlib.contextmanager
def speaking_python(keywords: dict[str, Any], aliases: dict[str, str] | None = None) -> Iterator[None]:
    """Around a library entry point's body (no extra frame: warnings keep pointing at the caller's line): a
    `HardenError` leaving it names `keywords` instead of their flags."""
    try:
        yield
    except HardenError as e:
        e.message = python_words(e.message, keywords, aliases)
        e.hint = python_words(e.hint, keywords, aliases)
        e.args = (e.message,)
        raise
