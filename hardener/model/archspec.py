"""Resolve `--arch package.module:callable` or `path/to/file.py:callable` to a model constructor.

Trust model (docs/reliability.md, "Security model"): code is imported only when the *user* names it -- `--arch`,
`arch=`, a module prefix in `--trust-arch`/`HARDEN_TRUSTED_ARCH` -- never because a checkpoint names it.
Whatever the source, the constructor must be an `nn.Module` subclass or a plain Python function defined
in a model package (not the standard library, not builtins, not torch itself), and what it returns must
be an `nn.Module`. Module names are imported without the current directory on the import path; a file
in the current directory is imported only through an explicit `file.py:callable`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import InputError

TRUST_ENV = "HARDEN_TRUSTED_ARCH"
# Packages whose plain functions are never model constructors (they run commands, load pickles, fetch code).
DENIED_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "builtins", "torch", "numpy", "safetensors", "hardener", "click", "pip", "setuptools", "pkg_resources",
    "IPython", "dill", "joblib", "cloudpickle", "requests", "urllib3",
}
# Paths whose meaning depends on the reading process (its working directory, its open files), not on the file system.
PROCESS_PATHS = ("/proc", "/dev", "/sys")


def is_file_spec(spec: str) -> bool:
    target = spec.rsplit(":", 1)[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def parse_kwargs(text: str | dict | None, what: str = "--arch-kwargs") -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} must be a JSON object, got '{text}' ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a JSON object, got '{text}'")
    return obj


def trusted_prefixes(extra: str | list[str] | None = None) -> list[str]:
    """Module prefixes the user trusts for architectures stored in checkpoints (HARDEN_TRUSTED_ARCH + extra)."""
    items: list[str] = []
    for src in (os.environ.get(TRUST_ENV, ""), extra or ""):
        parts = src.split(",") if isinstance(src, str) else list(src)
        items += [p.strip() for p in parts if p and p.strip()]
    return items


def module_of(spec: str) -> str | None:
    """The module a `package.module:callable` spec names (None for a file spec or a malformed one)."""
    if ":" not in spec or is_file_spec(spec):
        return None
    return spec.rsplit(":", 1)[0]


def is_trusted(spec: str, prefixes: list[str]) -> bool:
    """A module spec whose module equals a trusted prefix or lies under it (file specs never match)."""
    mod = module_of(spec)
    if not mod:
        return False
    return any(mod == p or mod.startswith(p.rstrip(".") + ".") for p in prefixes)


def _is_cwd(entry: str, cwd: str) -> bool:
    if entry in ("", "."):
        return True
    try:
        return os.path.realpath(entry) == cwd
    except (OSError, ValueError):
        return False


def _denied_top(top: str) -> bool:
    """A denied package, or a module of the interpreter itself: built in, or frozen into it (`__hello__` prints on
    import and is not in sys.stdlib_module_names). Looking for a frozen module imports nothing."""
    import importlib.machinery

    return (top in DENIED_PACKAGES or top in sys.builtin_module_names
            or importlib.machinery.FrozenImporter.find_spec(top) is not None)


def denied_module(name: str) -> str | None:
    """Why harden never imports module `name` for an architecture (None: it may). Checked before any import:
    importing `antigravity`, `this` or a package's `__main__` already runs code (opens a browser, prints, runs
    tests, exits). A module of a denied package that is already loaded is only looked up (torch.nn's classes)."""
    parts = name.split(".")
    if "__main__" in parts:
        return "is a program's entry point, not a model package"
    if _denied_top(parts[0]) and name not in sys.modules:
        return (f"belongs to '{parts[0]}' (the standard library, torch, harden or a tool that runs code), whose "
                "modules harden never imports for an architecture")
    return None


def _trail(path: str, limit: int = 40) -> list[str]:
    """Every path the lookup of the absolute `path` passes through, symlink targets included."""
    todo, cur, seen, hops = list(reversed(Path(path).parts)), os.sep, [], 0
    while todo:
        part = todo.pop()
        if part == os.sep:  # the root: the start, or an absolute link target
            cur = os.sep
        elif part == "..":
            cur = os.path.dirname(cur)
        else:
            nxt = os.path.join(cur, part)
            seen.append(nxt)
            if not os.path.islink(nxt):
                cur = nxt
                continue
            hops += 1
            if hops > limit:
                raise InputError(f"the checkpoint's architecture path '{path[:200]}' is a loop of symlinks")
            todo += reversed(Path(os.readlink(nxt)).parts)  # a relative target continues from the link's folder
    return seen


def check_stored(spec: str) -> None:
    """Path rules for an architecture a file names (checked before anything is imported, trusted or not): an
    absolute path that names the same file whatever the working directory -- no '.'/'..' parts, and neither it nor
    a symlink on its way passes through /proc, /dev or /sys (`/proc/self/cwd/evil.py` is `./evil.py`)."""
    if not is_file_spec(spec):
        return
    target = spec.rsplit(":", 1)[0]
    if not os.path.isabs(target) or any(p in (".", "..") for p in target.replace("\\", "/").split("/")):
        raise InputError(f"the checkpoint names its architecture by a relative file path ('{target[:200]}'), which "
                         "would be imported from the current directory: pass --arch yourself")
    try:
        trail = _trail(target)
    except (OSError, ValueError) as e:
        raise InputError(f"the checkpoint's architecture file '{target[:200]}' cannot be resolved ({e}): pass --arch "
                         "yourself") from None
    via = next((t for t in [target, *trail] if any(t == r or t.startswith(r + "/") for r in PROCESS_PATHS)), None)
    if via is not None:
        raise InputError(f"the checkpoint names its architecture by the path '{target[:200]}', which goes through "
                         f"'{via[:200]}' (its meaning depends on the reading process, e.g. its working directory): "
                         "pass --arch yourself")


def import_module(name: str, what: str) -> types.ModuleType:
    """Import `name` with the current directory off the import path (unless PYTHONPATH puts it there)."""
    cwd = os.path.realpath(os.getcwd()) if os.path.isdir(".") else ""
    explicit = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not (_is_cwd(p, cwd) and os.path.realpath(p or ".") not in explicit)]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InputError(f"{what}: cannot import module '{name}' ({e}); a file in the current directory "
                         "is named as file.py:callable") from None
    except BaseException as e:  # noqa: BLE001 - a module's top level may raise (or exit) anything
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InputError(f"{what}: importing '{name}' failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path[:] = saved


def check_constructor(fn: Any, spec: str, what: str = "--arch") -> Callable[..., nn.Module]:
    """Accept an nn.Module subclass or a plain Python function of a model package; refuse anything else."""
    if inspect.isclass(fn):
        if issubclass(fn, nn.Module):
            return fn
        raise InputError(f"{what} '{spec}' names the class {fn.__name__}, which is not a torch.nn.Module")
    if isinstance(fn, types.MethodType) and inspect.isclass(fn.__self__):  # a classmethod: Class.from_config
        fn_module = getattr(fn.__func__, "__module__", None) or ""
        if fn_module and not _denied_top(fn_module.split(".")[0]):
            return fn  # (`resolve` checked that the class defines it itself, in the module the spec names)
        raise InputError(f"{what} '{spec}' names a method of '{fn_module}', which is not a model constructor")
    if isinstance(fn, types.FunctionType):
        top = (getattr(fn, "__module__", None) or "").split(".")[0]
        if top and not _denied_top(top) and fn.__name__ != "<lambda>":
            return fn
        raise InputError(f"{what} '{spec}' names a function of '{fn.__module__}', which is not a model "
                         "constructor: harden builds models only with nn.Module classes or functions of model "
                         "packages")
    raise InputError(f"{what} '{spec}' names a {type(fn).__name__}, not an nn.Module class or a model-building "
                     "function")


def resolve(spec: str, what: str = "--arch", allow_dotted: bool = True) -> Callable[..., nn.Module]:
    """The constructor a spec names. `Class.from_config` (a classmethod the class itself defines, the class defined
    in the named module) only when `allow_dotted`: the user's own --arch, never a spec read from a checkpoint."""
    if isinstance(spec, str) and not spec.isprintable():  # a newline would forge a second line of output
        raise InputError(f"{what} {ascii(spec[:200])} holds control characters; it must be "
                         "'package.module:callable' or 'path/to/file.py:callable'")
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"{what} '{spec}' must be 'package.module:callable' or 'path/to/file.py:callable'")
    target, attr = spec.rsplit(":", 1)
    parts = attr.split(".")
    if not target or len(parts) > 2 or not all(p.isidentifier() and not p.startswith("_") for p in parts):
        raise InputError(f"{what} '{spec}' must be 'package.module:callable' or 'path/to/file.py:callable' "
                         "(callable may be Class.classmethod, e.g. Class.from_config)")
    if len(parts) == 2 and not allow_dotted:
        raise InputError(f"{what} '{spec}' names a classmethod: a checkpoint's own arch must be a class or a "
                         "function; pass --arch to use it")
    if is_file_spec(spec):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"{what} '{spec}': file '{target}' does not exist")
        mod_name = f"harden_arch_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise InputError(f"{what} '{spec}': '{target}' is not a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException as e:  # noqa: BLE001 - user code may raise anything
                del sys.modules[mod_name]
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise InputError(f"{what} '{spec}': importing '{target}' failed: {type(e).__name__}: {e}") from None
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            raise InputError(f"{what} '{spec}': '{target}' is not a module name")
        why = denied_module(target)
        if why:
            raise InputError(f"{what} '{spec}': module '{target}' {why}; name the model's own package")
        module = sys.modules.get(target) or import_module(target, f"{what} '{spec}'")
    fn = getattr(module, parts[0], None)
    if len(parts) == 2:  # a classmethod defined by a class of this very module (not inherited, not via an import)
        cls = fn
        if not (inspect.isclass(cls) and cls.__module__ == module.__name__
                and isinstance(cls.__dict__.get(parts[1]), classmethod)):
            raise InputError(f"{what} '{spec}': '{parts[0]}' is not a class of '{target}' defining the classmethod "
                             f"'{parts[1]}'")
        fn = getattr(cls, parts[1])
    if fn is None or not callable(fn):
        raise InputError(f"{what} '{spec}': '{target}' has no callable '{attr}'")
    return check_constructor(fn, spec, what)


def build(spec: str, kwargs: dict[str, Any], what: str = "--arch", allow_dotted: bool = True) -> nn.Module:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InputError(f"{what} '{spec}': keyword arguments must be a JSON object")
    fn = resolve(spec, what, allow_dotted)
    try:
        net = fn(**kwargs)
    except BaseException as e:  # noqa: BLE001 - user code may raise (or exit) anything, BaseException's kin included
        if isinstance(e, KeyboardInterrupt):
            raise
        raise InputError(f"{what} '{spec}' with kwargs {kwargs} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"{what} '{spec}' returned {type(net).__name__}, not a torch.nn.Module")
    # torch.compile(model) wraps the module (its keys gain `_orig_mod.`): harden hooks and saves the module itself
    inner = getattr(net, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(net).__name__ == "OptimizedModule" else net
