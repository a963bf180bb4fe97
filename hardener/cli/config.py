"""Options from a config file: `harden.toml` in the working directory, or `--config FILE`.

Top-level keys apply to every command; `[patch]`, `[eval]`, ... tables to one. Keys are option
names (`arch`, `mean`, `at`, `eval_data`, or with dashes). The command line wins over the file.

A `harden.toml` found in the working directory is announced on stderr. No config file can switch on
`trust_pickle` or `trust_arch`: trusting code is a decision made on the command line only.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..options.choices import CONFIG_FILE as DEFAULT_FILE

COMMAND_LINE_ONLY = ("trust_pickle", "trust_arch", "force")
COMMANDS = ("layers", "patch", "eval", "export")


def find_option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def find_config(args: list[str]) -> Path | None:
    given = find_option(args, "--config")
    if given is not None:
        return Path(given)
    p = Path(DEFAULT_FILE)
    return p if p.is_file() else None


def _number(key: str, v: Any, path: Path) -> Any:
    """A TOML number harden can hold: finite (`inf`, `nan`, 1e400 are not) and an integer within 64 bits."""
    if isinstance(v, float) and not math.isfinite(v):
        raise InputError(f"config file '{path}': '{key}' must be a finite number, got {v}")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 63 - 1:
        raise InputError(f"config file '{path}': '{key}' = {v} is out of range (at most {2 ** 63 - 1})")
    for x in v if isinstance(v, list) else ():
        _number(key, x, path)
    return v


def _value(v: Any, multiple: bool) -> Any:
    if multiple:
        return [str(x) for x in v] if isinstance(v, list) else [str(v)]
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        import json
        return json.dumps(v)
    return v


def load_defaults(path: Path, command: str, params: dict[str, bool]) -> dict[str, Any]:
    """The options `path` sets for `command`, whose parameters are `params` (name -> takes several values)."""
    from ..options.validate import regular_input

    regular_input(path, "config file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"config file '{path}' is not valid TOML: {str(e).splitlines()[0]}") from None
    except (OSError, RecursionError) as e:
        raise InputError(f"cannot read config file '{path}': {getattr(e, 'strerror', None) or e}") from None
    flat = {k: v for k, v in doc.items() if not isinstance(v, dict) or k not in COMMANDS}
    section = doc.get(command or "")
    section = section if isinstance(section, dict) else {}
    for table in [doc, *(v for v in doc.values() if isinstance(v, dict))]:  # in any table, for any command
        for key in table:
            name = str(key).replace("-", "_")
            if name in COMMAND_LINE_ONLY:
                raise InputError(f"config file '{path}' sets '{key}': {name.replace('_', '-')} can only be given "
                                 f"on the command line (--{name.replace('_', '-')})")
    out: dict[str, Any] = {}
    for source, strict in ((flat, False), (section, True)):
        for key, v in source.items():
            name = key.replace("-", "_")
            if name not in params:
                if strict:
                    raise InputError(f"config file '{path}': [{command}] has unknown key '{key}'")
                continue  # a top-level key for another command
            out[name] = _value(_number(key, v, path), params[name])
    return out


def command_defaults(command: str, args: list[str], params: dict[str, bool]) -> dict[str, Any]:
    """The defaults of one command line: from the config file, then from the preset (`--preset`, in the file, or
    the default one), so that the order is: command line, config file, preset, built-in defaults. `params` maps the
    command's parameter names to whether each takes several values."""
    from ..options.recipe import resolve_preset

    path = find_config(args)
    defaults: dict[str, Any] = {}
    if path is not None and find_option(args, "--config") is None:
        from ..runtime.console import (
            err,  # rich, imported only to say this (keeps `harden --help` fast)
        )

        err(f"harden: reading options from '{path}' in the working directory (--config FILE to choose another)")
    if path is not None:
        defaults = load_defaults(path, command, params)
    if "preset" in params:
        given = set(defaults) | _on_command_line(args, set(params))
        preset, options = resolve_preset(find_option(args, "--preset") or defaults.get("preset") or "auto", given,
                                         set(params))
        if preset is not None:
            defaults = {**options, **defaults, "preset": preset.name}
    return defaults


def _on_command_line(args: list[str], names: set[str]) -> set[str]:
    """Which of the parameter `names` the command line sets (by their `--flag-name` spelling)."""
    flags = {"--" + n.replace("_", "-"): n for n in names}
    return {flags[a.split("=", 1)[0]] for a in args if a.split("=", 1)[0] in flags}
