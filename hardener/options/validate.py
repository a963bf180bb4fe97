"""Validation at the boundaries: checkpoint manifests, option values, input and output paths.

Everything here raises `InputError` (exit 2) with one line naming the field, flag or file.
"""
from __future__ import annotations

import math
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import InputError

MAX_PATCHES = 4096
MAX_CHANNELS = 1 << 16
MAX_TEXT = 1000
HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------- manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Fields:
    """Typed access to one JSON object of a manifest; errors name the field path."""

    def __init__(self, d: Any, where: str, source: str) -> None:
        if not isinstance(d, dict):
            raise InputError(f"{source}: manifest field '{where}' must be a JSON object, got {_type(d)}")
        self.d, self.where, self.source = d, where, source

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, what: str) -> InputError:
        return InputError(f"{self.source}: manifest field '{self.name(key)}' {what}, got "
                          f"{_show(self.d.get(key))}")

    def known(self, keys: set[str]) -> None:
        extra = sorted(set(self.d) - keys, key=str)
        if extra:
            raise InputError(f"{self.source}: manifest has unknown field '{self.name(str(extra[0]))}'")

    def get(self, key: str, check, what: str, default: Any = ..., required: bool = False) -> Any:
        if key not in self.d:
            if required or default is ...:
                raise InputError(f"{self.source}: manifest lacks the field '{self.name(key)}'")
            return default
        v = self.d[key]
        if not check(v):
            raise self.fail(key, what)
        return v


def _type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    text = repr(v)
    return _type(v) + (f" {text}" if len(text) <= 40 else "")


def _text(limit: int = MAX_TEXT):
    return lambda v: isinstance(v, str) and len(v) <= limit


def _opt(check):
    return lambda v: v is None or check(v)


def _int_in(lo: int, hi: int):
    return lambda v: _is_int(v) and lo <= v <= hi


def _num(lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False):
    return lambda v: _is_num(v) and (v > lo if open_lo else v >= lo) and v <= hi


# Public names of the rules above, for the spec fields of patch kinds (hardener.patches.base).
int_in, number, optional, text = _int_in, _num, _opt, _text


# ---------------------------------------------------------------- options


# name -> (check, requirement); None values (option not given) pass. The options of patch kinds and training methods
# are not here: their configs declare their ranges (`optspec`, `kind_options`). Counts stop at MAX_COUNT (far beyond any
# physical run, and inside every integer type torch and numpy take); seeds span what torch.manual_seed takes.
MAX_COUNT = 2 ** 31 - 1
MAX_SEED = 2 ** 63 - 1


def _ge(n, hi: int = MAX_COUNT):
    return (lambda v: n <= v <= hi), f"must be an integer in {n}..{hi}"


def _finite_pos():
    return (lambda v: math.isfinite(v) and v > 0), "must be a finite positive number"


def _finite_nonneg():
    return (lambda v: math.isfinite(v) and v >= 0), "must be a finite number >= 0"


def _pixel_sigma(zero_ok: bool):
    """A noise level in pixel units: at most 1 (the whole pixel range), above 0 (or 0 too, meaning no noise)."""
    return ((lambda v: math.isfinite(v) and (0 <= v if zero_ok else 0 < v) and v <= 1),
            f"must be a number in {'[' if zero_ok else '('}0, 1] (pixel units: 25/255 is 0.098)")


def parse_level(value: Any) -> float:
    """A noise level or any pixel-unit number as a user writes it: 0.25, '0.25' or a fraction like '64/255';
    ValueError with the requirement otherwise (the range is `OPTION_RULES`')."""
    from fractions import Fraction

    if isinstance(value, bool):
        raise ValueError(f"must be a number or a fraction like 64/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"must be a number or a fraction like 64/255, got '{value}'") from None


def _open_unit():
    return (lambda v: math.isfinite(v) and 0 < v < 1), "must be a number in (0, 1)"


OPTION_RULES: dict[str, tuple] = {
    "batch_size": _ge(1), "steps": _ge(1), "restarts": _ge(1), "queries": _ge(1), "epochs": _ge(1),
    "max_samples": _ge(1), "eval_samples": _ge(0), "eval_steps": _ge(1), "save_every": _ge(0),
    "select_on": _ge(0), "validate": _ge(0), "validate_every": _ge(1),
    "e2e_samples": _ge(0), "e2e_steps": _ge(1), "neighbour_steps": _ge(1), "iterations": _ge(1),
    "post_batch": _ge(2), "seed": _ge(0, MAX_SEED),
    "lr": _finite_pos(), "post_lr": _finite_pos(), "alpha": _finite_pos(), "lam": _finite_nonneg(),
    "mu": _finite_nonneg(), "gamma": _finite_nonneg(), "eps_warmup": _finite_nonneg(),
    # harden certify's noise level (as SmoothingConfig has it; harden patch's --sigma is AdvAmd's, declared there) and
    # the training's: a standard deviation in [0, 1] pixel units, so at most the whole pixel range (a σ of 25 meant
    # for 25/255 would certify radii beyond any image's diameter)
    "sigma": _pixel_sigma(False), "smooth_sigma": _pixel_sigma(False), "noise_sigma": _pixel_sigma(True),
    "max_radius": _finite_pos(),
    "ema": ((lambda v: math.isfinite(v) and 0 <= v < 1), "must be a number in [0, 1)"),
    "pseudo_threshold": ((lambda v: math.isfinite(v) and 0 <= v <= 1), "must be a number in [0, 1]"),
    "pseudo_ratio": _finite_pos(), "n0": _ge(1), "n_samples": _ge(1), "smooth_n": _ge(1),
    "smooth_alpha": _open_unit(), "certify_alpha": _open_unit(),  # failure probabilities
}
# Options whose name means something else in one command: harden certify's --alpha is a failure probability
# (harden patch's is a step size, OPTION_RULES["alpha"])
COMMAND_RULES: dict[str, dict[str, str]] = {"certify": {"alpha": "certify_alpha"}}


def check_range(name: str, value: Any, rule: str | None = None) -> None:
    """A library argument against its option's range (`OPTION_RULES[rule or name]`, the one the command line's
    boundary checks), the error naming the Python parameter; None (not given) and non-numbers pass."""
    check, requirement = OPTION_RULES[rule or name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not check(value):
        raise InputError(f"{name} {requirement}, got {value}")


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
          "dict": (dict,), "tuple": (tuple,), "list": (list,), "Any": (object,)}


def check_arg(name: str, value: Any, annotation: str) -> Any:
    """A library argument against its annotation ('int', 'str | float | None', ...): the type, numbers finite and
    within 64 bits, no bool where a number belongs. The error names the Python parameter."""
    kinds = [k.strip() for k in annotation.split("|")]
    ok = any(isinstance(value, _TYPES.get(k, (object,))) for k in kinds)
    if isinstance(value, bool) and "bool" not in kinds and "Any" not in kinds:
        ok = False
    if not ok:
        raise InputError(f"{name} must be {' or '.join(k.replace('None', 'None (not given)') for k in kinds)}, got "
                         f"{_show(value)} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if _is_int(value) and abs(value) > 2 ** 63 - 1:
        raise InputError(f"{name} = {value} is out of range (at most {2 ** 63 - 1})")
    return value


def memory() -> int:
    """Bytes of memory a run may use at most: the machine's, or the address-space limit where lower."""
    from ..data import memory_budget

    return 2 * memory_budget()  # the data's budget is half of it


def check_memory(what: str, nbytes: float, fix: str) -> None:
    """A value whose tensors alone would not fit in memory is refused before anything is allocated (exit 2): the
    estimate counts only what the value forces, so a refusal is physically absurd, never merely large."""
    total = memory()
    if nbytes > total:
        raise InputError(f"{what} would take about {nbytes / 2 ** 30:,.1f} GiB of memory, more than this process "
                         f"may use ({total / 2 ** 30:,.1f} GiB): {fix}")


def check_batch_memory(batch: int, shape: list[int] | tuple[int, ...], copies: int, flag: str = "--batch-size") -> None:
    """`batch` images of `shape` (float32), `copies` of them at once, against the memory, once the shape is known."""
    check_memory(f"{flag} {batch} of {'x'.join(map(str, shape))} images", copies * 4 * batch * math.prod(shape),
                 f"lower {flag}")


def check_pair(pair: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if pair is not None and (pair[0] < 1 or pair[1] < 1 or pair[0] * pair[1] > 1 << 26):
        raise InputError(f"{what} must be two positive sizes H,W (at most 64 megapixels), got {pair[0]},{pair[1]}")
    return pair


# ---------------------------------------------------------------- paths


def regular_input(path: str | Path, what: str) -> Path:
    """An input file that exists and is a regular file (a FIFO or device would hang or never end)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise InputError(f"cannot read {what} '{path}': {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or device?)"
        raise InputError(f"{what} '{path}' is {kind}")
    return p
