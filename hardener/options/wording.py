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

LITERALS = frozenset({"cpu", "cuda", "auto", "mps", "none", "all"})  # bare values that follow a flag: quoted
QUANTITY = re.compile(r"\b(raise|lower|smaller|larger|higher|fewer|more)\s+$")  # "raise epochs": a bare keyword
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
)
FLAG = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ('[^']*'|\"[^\"]*\"|\d[\d./e+-]*(?<![./e+-])|[a-z][a-z0-9-]*(?:,[a-z0-9-]+)*))?")


def python_words(text: str, keywords: dict[str, Any], aliases: dict[str, str] | None = None) -> str:
    """`text` with each `--flag [value]` whose keyword (dashes as underscores, or `aliases[...]`) is in `keywords`
    (name -> default) written as a keyword: `flag=value` for a quoted value, a number, one of LITERALS or a word
    that ends a phrase after a flag whose default is text (quoted); `flag=True` (`False` for `--no-flag`) for a flag
    whose default is False; the bare keyword as the subject of a sentence or after a quantity ("raise epochs"),
    `flag=` otherwise ("pass teacher="). PHRASES first."""
    aliases = aliases or {}
    for pattern, words in PHRASES:
        text = re.sub(pattern, words, text)

    def sub(m: re.Match) -> str:
        neg, flag, value = m.groups()
        key = aliases.get(flag, flag.replace("-", "_"))
        if key not in keywords:
            return m.group(0)
        rest = f" {value}" if value else ""
        if neg:
            return f"{key}=False{rest}"
        if value and (value[0] in "'\"" or value[0].isdigit()):
            return f"{key}={value}"
        if value in LITERALS or (value and isinstance(keywords[key], str) and not _prose(m)):
            return f"{key}={value!r}"  # a known value, or a word that ends a phrase after a text option: its value
        if keywords[key] is False:
            return f"{key}=True{rest}"
        if value or QUANTITY.search(m.string[:m.start()]):
            return f"{key}{rest}"  # the subject of a sentence ("eps must be ..."), a quantity ("raise epochs")
        return f"{key}="  # what to pass ("pass teacher= (a patched checkpoint)", "(device=)")

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
