"""Options owned by patch kinds and training methods: each is a field of its owner's config dataclass, declared with
`option(default, lo=..., hi=..., help=...)`, and that field is the one place its default, range, help text and flag
are stated. The command line (`cli.options.owned_opts`), `harden.toml` (its keys are the command's options), the library
(`PatchOptions.build`) and the configs themselves (`Options.__post_init__`) read them from there. Torch-free: the
built-in configs live in `kind_options`, so `harden --help` lists them without importing torch.

An option's name is the field's unless `name=` says otherwise (`FixerConfig.rank` is the option `fixer_rank`); two
configs may share an option (fixers and pre-filters both take `delta`) only by declaring the same `Option` object.
Fields without `option()` are internal: they keep their default and no user sets them.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from ..errors import InputError


@dataclass(frozen=True)
class Option:
    """One option: its default, range (`lo`/`hi`, closed unless `open_lo`/`open_hi`), choices, help text, flag
    (default `--name-with-dashes`), option name (default: the field's), `--help` group (default: "recipe" for a patch
    kind's, "training" for a method's), `parse` (text -> value, for values written as text: CLI, TOML) and `kind`, the
    value's type where the default does not say it (default None: str unless `kind` says otherwise; None stays
    allowed, as "not given")."""

    default: Any
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    name: str | None = None
    group: str = ""
    parse: Callable[[Any], Any] | None = None
    kind: type | None = None

    @property
    def value_type(self) -> type:
        return self.kind or (str if self.default is None else type(self.default))

    def field(self) -> Any:
        """The dataclass field that declares this option."""
        return field(default=self.default, metadata={"option": self})

    def requirement(self) -> str:
        """What a value must be, as the error says it ("must be a number in (0, 1)")."""
        if self.choices is not None:
            return f"must be one of {', '.join(self.choices)}"
        t = self.value_type
        if t is bool:
            return "must be true or false"
        if t is str:
            return "must be a string"
        if t is tuple:
            each = Option(0.0, lo=self.lo, hi=self.hi, open_lo=self.open_lo, open_hi=self.open_hi).requirement()
            return f"must be {len(self.default)} numbers, each {each.removeprefix('must be ')}"
        if self.lo is not None and self.hi is not None:
            if t is int:
                return f"must be an integer in {self.lo}..{self.hi}"
            left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
            return f"must be a number in {left}{self.lo}, {self.hi}{right}"
        if self.lo is not None:
            if t is int:
                return f"must be an integer >= {self.lo}"
            return "must be a finite positive number" if (self.lo, self.open_lo) == (0, True) else \
                f"must be a finite number {'>' if self.open_lo else '>='} {self.lo}"
        return "must be an integer" if t is int else "must be a finite number"

    def ok(self, v: Any) -> bool:
        """Whether `v` (parsed) is a value of this option."""
        t = self.value_type
        if v is None:
            return self.default is None
        if self.choices is not None:
            return isinstance(v, str) and v in self.choices
        if t in (bool, str):
            return isinstance(v, t)
        if t is tuple:  # numbers, as many as the default has, each in the range
            return isinstance(v, tuple) and len(v) == len(self.default) and all(self._in(x) for x in v)
        return self._in(v) and (isinstance(v, int) or t is not int)

    def _in(self, v: Any) -> bool:
        if not _number(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.open_lo else v >= self.lo)
        return lo_ok and (self.hi is None or (v < self.hi if self.open_hi else v <= self.hi))

    def check(self, v: Any, what: str) -> Any:
        """`v` parsed and checked; `InputError` naming `what` (a Python parameter or a flag) otherwise."""
        if self.parse is not None and isinstance(v, str):
            v = self.parse(v, what)
        if not self.ok(v):
            raise InputError(f"{what} {self.requirement()}, got {v!r}" if isinstance(v, str) else
                             f"{what} {self.requirement()}, got {v}")
        return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def option(default: Any, **kwargs: Any) -> Any:
    """A config dataclass field that is an option (see `Option`)."""
    return Option(default, **kwargs).field()


def declared(config_cls: type) -> list[tuple[str, str, Option]]:
    """(field name, option name, Option) of each option field of a config dataclass."""
    out = []
    for f in fields(config_cls):
        spec = f.metadata.get("option")
        if isinstance(spec, Option):
            out.append((f.name, spec.name or f.name, spec))
    return out


def flag(name: str, spec: Option) -> str:
    return spec.flag or "--" + name.replace("_", "-")


class Options:
    """Base of the built-in configs: each option field checked against its declaration on construction (errors name
    the flag: the library checks its keywords first, by their Python names, in `PatchOptions.build`)."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(config: Any) -> Any:
    """Every option field of a config dataclass instance against its declaration (the error names its flag)."""
    for fname, name, spec in declared(type(config)):
        setattr(config, fname, spec.check(getattr(config, fname), flag(name, spec)))
    return config


def read(config_cls: type, get: Callable[[str, str], Any]) -> Any:
    """`config_cls` from `get(field name, option name)` (None or MISSING: the field's default), checked."""
    values = {}
    for f in fields(config_cls):
        spec = f.metadata.get("option")
        name = spec.name or f.name if isinstance(spec, Option) else spec if isinstance(spec, str) else f.name
        v = get(f.name, name)
        if v is not None and v is not MISSING:
            values[f.name] = v
    return check_fields(config_cls(**values))
