"""Every option the patch kinds and training methods own, walked from their registries (`optspec` declares them):
the built-in configs (`kind_options`, torch-free: `harden --help` lists them without torch), then those of the kinds
and methods registered now. A kind or method registered from outside brings its options to the library, harden.toml
and the command line (which asks here when a command runs)."""
from __future__ import annotations

import sys
from typing import Any

from .kind_options import BUILTIN
from .optspec import Option, declared, flag


def config_classes() -> list[tuple[str, type]]:
    """(group, config dataclass) of every owner: the built-in configs (torch-free), then those of the patch kinds and
    methods registered now (`patches.KINDS`, `methods.REGISTRY`: read where those modules are loaded; a kind or method
    registered from outside loads them), each class once."""
    out = list(BUILTIN)
    for module, table, group in (("hardener.patches.base", "KINDS", "recipe"),
                                 ("hardener.methods.base", "REGISTRY", "training")):
        loaded = sys.modules.get(module)
        out += [(group, c.config_cls) for c in getattr(loaded, table, {}).values()] if loaded else []
    seen: set[type] = set()
    return [(g, c) for g, c in out if not (c in seen or seen.add(c))]


def owned() -> dict[str, tuple[str, Option]]:
    """Option name -> (its `--help` group, its declaration), over every owner; a name two owners declare differently
    is an error of the second owner."""
    out: dict[str, tuple[str, Option]] = {}
    for group, cls in config_classes():
        for _, name, spec in declared(cls):
            if name in out and out[name][1] is not spec:
                raise TypeError(f"option '{name}' of {cls.__name__} is declared again: share the first declaration "
                                f"(one Option object) or give it another name")
            out.setdefault(name, (spec.group or group, spec))
    return out


def admit(table: dict, name: str, cls: type) -> None:
    """`table[name] = cls` (a registry of kinds or methods), undone with a `TypeError` when the options of its
    `config_cls` disagree with another owner's."""
    before, table[name] = table.get(name), cls
    try:
        owned()
    except TypeError:
        del table[name]
        if before is not None:
            table[name] = before
        raise


def find(name: str) -> Option | None:
    """The declaration of the owned option `name` (None: not an owned option)."""
    hit = owned().get(name)
    return hit[1] if hit else None


def default(name: str) -> Any:
    """The default of the owned option `name` (for a trainer field that mirrors it)."""
    spec = find(name)
    if spec is None:
        raise KeyError(name)
    return spec.default


def aliases() -> dict[str, str]:
    """Flag spellings that differ from the option name (`loss` -> `loss_name`): the library takes both."""
    out = {}
    for name, (_, spec) in owned().items():
        short = flag(name, spec).lstrip("-").replace("-", "_")
        if short != name:
            out[short] = name
    return out
