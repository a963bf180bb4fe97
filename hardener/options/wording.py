"""The library speaks Python: an error raised under `speaking_python(keywords)` names keywords (`device='cpu'`,
`trust_arch=True`, `epochs`), not the command line's flags (`--device cpu`, `--trust-arch`, `--epochs`). Messages are
written once, in the command line's words; the library's entry points (`hardener.patch`, `.evaluate`, `.certify`,
`.load`) translate the flags their own keywords answer to, and leave any other (a flag with no keyword stays as it
is, `harden layers` too)."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from ..errors import HardenError

LITERALS = frozenset({"cpu", "cuda", "auto", "mps", "none", "all"})  # bare values that follow a flag: quoted
FLAG = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ('[^']*'|\"[^\"]*\"|\d[\d./e+-]*(?<![./e+-])|[a-z][a-z0-9-]*(?:,[a-z0-9-]+)*))?")


def python_words(text: str, keywords: dict[str, Any], aliases: dict[str, str] | None = None) -> str:
    """`text` with each `--flag [value]` whose keyword (dashes as underscores, or `aliases[...]`) is in `keywords`
    (name -> default) written as a keyword: `flag=value` for a quoted value, a number, one of LITERALS or a word
    that ends a phrase after a flag whose default is text (quoted), `flag=True` (`False` for `--no-flag`) for a flag whose default is
    False, the bare keyword otherwise."""
    aliases = aliases or {}

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
