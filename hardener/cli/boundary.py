"""The boundary of one command run (`app._run` calls `check_run` before the command starts): numeric options against
their ranges, options that size tensors against the memory, and the output paths: never an input, never harden's own
side files, writable, with room for them, locked against a second run to the same --out. Above `model`, `resume` and
`validate` (whose rules it applies)."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import InputError, RunError
from ..io.resume import Saver
from ..model.classifier import parse_shape
from ..options import owners
from ..options.choices import CONFIG_FILE as DEFAULT_FILE
from ..options.validate import COMMAND_RULES, OPTION_RULES, _is_int, check_memory, regular_input


def _flag(param) -> str:
    """The option's long flags as the help shows them (`--n/--draws`: the error cannot know which one was typed)."""
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return "/".join(opts) if opts else f"--{param.name.replace('_', '-')}"


def check_options(ctx) -> None:
    """Every numeric option of the current command against OPTION_RULES (the options of kinds and methods against
    their declarations), naming the user's flag."""
    params = {p.name: p for p in ctx.command.params}
    owned = owners.owned() if ctx.command.name == "patch" else {}
    for name, value in ctx.params.items():
        if name in owned and value is not None:  # an option a kind or method declares: its range, parsed
            owned[name][1].check(value, _flag(params[name]))
            continue
        rule = OPTION_RULES.get(COMMAND_RULES.get(ctx.command.name, {}).get(name, name))
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        check, what = rule
        if not check(value):
            raise InputError(f"{_flag(params[name])} {what}, got {value}")


def check_sizes(params: dict) -> None:
    """Options that size tensors, against the memory before any loading: --width (a 3x3 layer of width x width
    channels, with its gradient and two optimiser moments) and --input-shape (an image, in the handful of copies a
    forward and backward pass hold)."""
    width = params.get("width")
    if _is_int(width):
        check_memory(f"--width {width}", 4 * 4 * 9 * width ** 2, "use a width of at most a few thousand (default 32)")
    shape = parse_shape(params.get("input_shape"))
    if shape:
        check_memory(f"--input-shape {','.join(map(str, shape))}", 8 * 4 * math.prod(shape),
                     "give the model's real input shape C,H,W")


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
            what = "is a file, not a folder" if parent.exists() else "does not exist"
            raise InputError(f"{flag} '{out}': folder '{parent}' {what}")
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
