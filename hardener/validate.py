"""Validation at the boundaries: checkpoint manifests, option values, input and output paths.

Everything here raises `InputError` (exit 2) with one line naming the field, flag or file.
"""
from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from .errors import InputError, RunError

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


def _flag(param) -> str:
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return max(opts, key=len) if opts else f"--{param.name.replace('_', '-')}"


# name -> (check, requirement); None values (option not given) pass. Counts stop at MAX_COUNT (far beyond any
# physical run, and inside every integer type torch and numpy take); seeds span what torch.manual_seed takes.
MAX_COUNT = 2 ** 31 - 1
MAX_SEED = 2 ** 63 - 1


def _ge(n, hi: int = MAX_COUNT):
    return (lambda v: n <= v <= hi), f"must be an integer in {n}..{hi}"


def _finite_pos():
    return (lambda v: math.isfinite(v) and v > 0), "must be a finite positive number"


def _finite_nonneg():
    return (lambda v: math.isfinite(v) and v >= 0), "must be a finite number >= 0"


def _finite():
    return (lambda v: math.isfinite(v)), "must be a finite number"


OPTION_RULES: dict[str, tuple] = {
    "batch_size": _ge(1), "steps": _ge(1), "restarts": _ge(1), "queries": _ge(1), "epochs": _ge(1),
    "max_samples": _ge(1), "eval_samples": _ge(0), "eval_steps": _ge(1), "save_every": _ge(0),
    "select_on": _ge(0), "validate": _ge(0), "validate_every": _ge(1), "width": _ge(1),
    "prefilter_stride": ((lambda v: isinstance(v, int) and 1 <= v <= 8), "must be an integer in 1..8"),
    "e2e_samples": _ge(0), "e2e_steps": _ge(1), "neighbour_steps": _ge(1), "iterations": _ge(1),
    "post_batch": _ge(2), "seed": _ge(0, MAX_SEED),
    "lr": _finite_pos(), "post_lr": _finite_pos(), "alpha": _finite_pos(), "rho": _finite_pos(),
    "delta": _finite(), "beta": _finite_nonneg(), "lam": _finite_nonneg(), "mu": _finite_nonneg(),
    "gamma": _finite_nonneg(), "eps_warmup": _finite_nonneg(), "sigma": _finite_nonneg(),
    "phi": ((lambda v: math.isfinite(v) and 0 <= v <= 1), "must be a number in [0, 1]"),
    "noise_sigma": _finite_nonneg(), "max_radius": _finite_pos(),
    "fixer_rank": ((lambda v: isinstance(v, int) and 0 <= v <= 4096), "must be an integer in 0..4096 (0: full rank)"),
    "ema": ((lambda v: math.isfinite(v) and 0 <= v < 1), "must be a number in [0, 1)"),
    "pseudo_threshold": ((lambda v: math.isfinite(v) and 0 <= v <= 1), "must be a number in [0, 1]"),
    "pseudo_ratio": _finite_pos(), "n0": _ge(1), "n_samples": _ge(1), "smooth_n": _ge(1),
    "smooth_alpha": ((lambda v: 0 < v < 1), "must be a number in (0, 1)"),
}


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


def check_options(ctx) -> None:
    """Every numeric option of the current command against OPTION_RULES, naming the user's flag."""
    params = {p.name: p for p in ctx.command.params}
    for name, value in ctx.params.items():
        rule = OPTION_RULES.get(name)
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        check, what = rule
        if not check(value):
            raise InputError(f"{_flag(params[name])} {what}, got {value}")


def memory() -> int:
    """Bytes of memory a run may use at most: the machine's, or the address-space limit where lower."""
    from .data import memory_budget

    return 2 * memory_budget()  # the data's budget is half of it


def check_memory(what: str, nbytes: float, fix: str) -> None:
    """A value whose tensors alone would not fit in memory is refused before anything is allocated (exit 2): the
    estimate counts only what the value forces, so a refusal is physically absurd, never merely large."""
    total = memory()
    if nbytes > total:
        raise InputError(f"{what} would take about {nbytes / 2 ** 30:,.1f} GiB of memory, more than this process "
                         f"may use ({total / 2 ** 30:,.1f} GiB): {fix}")


def check_sizes(params: dict) -> None:
    """Options that size tensors, against the memory before any loading: --width (a 3x3 layer of width x width
    channels, with its gradient and two optimiser moments) and --input-shape (an image, in the handful of copies a
    forward and backward pass hold)."""
    from .model import parse_shape

    width = params.get("width")
    if _is_int(width):
        check_memory(f"--width {width}", 4 * 4 * 9 * width ** 2, "use a width of at most a few thousand (default 32)")
    shape = parse_shape(params.get("input_shape"))
    if shape:
        check_memory(f"--input-shape {','.join(map(str, shape))}", 8 * 4 * math.prod(shape),
                     "give the model's real input shape C,H,W")


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


def _same(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: list[tuple[str, str | Path]], inputs: list[tuple[str, str | Path | None]],
                  force: bool) -> None:
    """No output is an input of the same run (with --force or not); an existing output needs --force;
    outputs go to existing folders and are regular files when they exist; no two outputs coincide."""
    seen: list[tuple[str, Path]] = []
    for flag, out in outputs:
        o = Path(out)
        for iflag, inp in inputs:
            if inp and not str(inp).startswith("fashion-mnist:") and _same(o, Path(inp)):
                raise InputError(f"{flag} '{out}' is also the run's input {iflag}: harden never overwrites an "
                                 "input, --force or not")
        for sflag, s in seen:
            if _same(o, s):
                raise InputError(f"{flag} '{out}' is also {sflag}: give each output its own file")
        seen.append((flag, o))
        parent = o.parent if str(o.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"{flag} '{out}': folder '{parent}' does not exist")
        writable(flag, out, parent)
        if o.is_symlink() or o.exists():
            if o.is_dir():
                raise InputError(f"{flag} '{out}' is a folder")
            if o.exists() and not o.is_file():
                raise InputError(f"{flag} '{out}' exists and is not a regular file (a pipe or device?)")
            if not force:
                raise InputError(f"{flag} '{out}' exists; pass --force to overwrite it or choose another file")


def writable(flag: str, out: Any, parent: Path) -> None:
    """The output's folder takes a file now, before any work (a read-only or full file system, no permission would
    otherwise end the run after training): a probe file is created and removed (exit 3 when it cannot be)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".harden-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"{flag} '{out}': cannot write in folder '{parent}' ({e.strerror or e}); choose a writable "
                       "folder") from None


_LOCKS: dict[str, tuple[int, Path]] = {}  # --out -> (the open lock file, its path), held until release_locks()


def lock_output(out: Any) -> None:
    """An exclusive lock on `out` (and so its side files) for this run: a second run to the same --out refuses
    with one line instead of both writing and both reporting success. The lock is `.NAME.lock` beside the output,
    removed by release_locks(); only rank 0 of a distributed run writes, so only it locks."""
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        return
    path = Path(out).resolve()
    lock = lock_path(out)
    while str(path) not in _LOCKS:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"--out '{out}' is being written by another harden run (lock '{lock}'); wait for it "
                             "or choose another file") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file between our open and lock: take the new one
            _LOCKS[str(path)] = (fd, lock)
        else:
            os.close(fd)


def release_locks() -> None:
    """Remove and release the output locks this process holds (at the end of a command)."""
    while _LOCKS:
        _, (fd, lock) = _LOCKS.popitem()
        lock.unlink(missing_ok=True)
        os.close(fd)


INPUT_PARAMS = (("model", "MODEL"), ("data", "--data"), ("eval_data", "--eval-data"), ("classes", "--classes"),
                ("config", "--config"), ("parent", "--parent"), ("surrogate", "--surrogate"),
                ("reference_data", "--reference-data"), ("preprocessor", "--preprocessor"),
                ("unlabeled", "--unlabeled"), ("base_cache", "--base-cache"), ("state_dir", "--state-dir"))


def run_inputs(params: dict) -> list[tuple[str, Any]]:
    """Every file and folder a command reads, by its flag: data, model (an HF folder too), class map, config file
    (harden.toml when none is given), preprocessor, unlabeled pool, the --arch Python file, caches and state."""
    from .config import DEFAULT_FILE

    inputs: list[tuple[str, Any]] = [(flag, params.get(name)) for name, flag in INPUT_PARAMS if params.get(name)]
    inputs = [(f, v) for f, v in inputs if not (f == "--unlabeled" and v == "rest")]
    if not params.get("config") and Path(DEFAULT_FILE).is_file():
        inputs.append(("config file", DEFAULT_FILE))
    arch = params.get("arch")
    if isinstance(arch, str) and ":" in arch and arch.rsplit(":", 1)[0].endswith(".py"):
        inputs.append(("--arch", arch.rsplit(":", 1)[0]))
    return inputs


def side_files(out: Any) -> list[Path]:
    """harden's own files beside an --out: the resumable state, its adversarial examples (cached or spilled, and
    the spill's completion tag) and the lock."""
    from .resume import Saver

    saver = Saver(Path(f"{out}.partial"), "")
    spill = saver.spill_path
    return [saver.path, saver.adv_path, spill, spill.with_name(spill.name + ".done"), lock_path(out)]


def lock_path(out: Any) -> Path:
    path = Path(out).resolve()
    return path.with_name(f".{path.name}.lock")


_OWN_NAMES = re.compile(r"(\.harden-.*|.*\.partial(\.adv\..*)?|\..*\.lock)")


def check_own_names(outputs: list[tuple[str, Any]], resume: bool) -> None:
    """Outputs never take the names of harden's own side files (state, caches, locks: harden deletes or replaces
    those), and a file already at a side-file name of --out is harden's only beside its interrupted run."""
    for flag, out in outputs:
        if _OWN_NAMES.fullmatch(Path(out).name):
            raise InputError(f"{flag} '{out}' is named like harden's own state, cache or lock files (.partial, "
                             ".partial.adv.*, .harden-*, .NAME.lock), which harden replaces and deletes: choose "
                             "another name")
        if flag != "--out":
            continue
        state, *others, lock = side_files(out)
        for p in others if not (resume and state.exists()) else []:
            if p.exists() or p.is_symlink():
                raise InputError(f"'{p}' exists but is no part of an interrupted run of --out '{out}' (there is "
                                 f"no '{state.name}'); harden would replace it: move it or choose another --out")
        if lock.is_file() and lock.stat().st_size:
            raise InputError(f"'{lock}' is not an empty lock file of harden's; move it or choose another --out")


def _inside(out: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and out.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_run(ctx, outputs: list[tuple[str, Any]], force: bool) -> None:
    """The boundary checks of one command: option values, then output paths against the run's inputs (and the
    files inside input folders), harden's own file names, then free space."""
    check_options(ctx)
    params = ctx.params
    check_sizes(params)
    if params.get("classes"):
        regular_input(params["classes"], "--classes file")
    outputs = [(flag, o) for flag, o in outputs if o]
    inputs = run_inputs(params)
    for flag, o in outputs:
        inside = next((f for f, i in inputs if _inside(Path(o), Path(i))), None)
        if inside is not None and inside != "--state-dir" and (Path(o).exists() or inside == "--base-cache"):
            raise InputError(f"{flag} '{o}' lies in the folder of the run's input {inside}: harden never "
                             "writes into an input, --force or not")
    check_own_names(outputs, bool(params.get("resume")))
    sides = [(f"the resumable state or lock of --out '{o}'", p) for flag, o in outputs if flag == "--out"
             for p in side_files(o)]
    check_outputs(outputs, inputs + sides, force)
    check_space([(flag, o, _rough_size(flag, params)) for flag, o in outputs])
    for flag, o in outputs:
        if flag == "--out":
            lock_output(o)


SMALL_OUTPUT = 1 << 20  # a report, rows, the state of an evaluation: free space of 1 MiB at least


def _rough_size(flag: str, params: dict) -> int:
    """An output's rough size: a checkpoint about its base's (patches are small), anything else small."""
    model = params.get("model")
    if flag != "--out" or not model:
        return SMALL_OUTPUT
    p = Path(model)
    try:
        return SMALL_OUTPUT + (sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir()
                               else p.stat().st_size)
    except OSError:
        return SMALL_OUTPUT


def check_space(needs: list[tuple[str, Any, int]]) -> None:
    """Enough free space for the outputs' rough sizes (summed per file system), before any work: exit 3 otherwise,
    instead of a disk full after training."""
    import shutil

    per_fs: dict[int, list] = {}
    for flag, out, size in needs:
        parent = Path(out).parent if str(Path(out).parent) else Path(".")
        try:
            entry = per_fs.setdefault(parent.stat().st_dev, [parent, 0, []])
        except OSError:
            continue  # a missing folder is check_outputs' error
        entry[1] += size
        entry[2].append(flag)
    for parent, need, flags in per_fs.values():
        free = shutil.disk_usage(parent).free
        if free < need:
            raise RunError(f"{' and '.join(flags)}: not enough free space in '{parent}' ({_mb(free)} free, about "
                           f"{_mb(need)} needed); free space or choose another folder")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def eval_state_dir(state_dir: str | None, reports: list[str]) -> Path | None:
    """Where `harden eval` keeps resumable state: --state-dir, HARDEN_CACHE_DIR, beside the first --report;
    None (nothing written, nothing resumable) when none is given. Never the working directory by default."""
    chosen = state_dir or os.environ.get("HARDEN_CACHE_DIR") or None
    if chosen:
        d = Path(chosen)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"state folder '{d}' cannot be created: {e.strerror}") from None
        if not d.is_dir():
            raise InputError(f"state folder '{d}' is not a folder")
        return d
    if reports:
        parent = Path(reports[0]).parent
        return parent if str(parent) else Path(".")
    return None
