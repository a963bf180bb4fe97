"""Resolve `--arch package.module:callable` or `path/to/file.py:callable` to a model constructor."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .errors import InputError


def is_file_spec(spec: str) -> bool:
    target = spec.rsplit(":", 1)[0]
    return target.endswith(".py") or "/" in target or "\\" in target


def parse_kwargs(text: str | dict | None) -> dict[str, Any]:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--arch-kwargs must be a JSON object, got '{text}' ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"--arch-kwargs must be a JSON object, got '{text}'")
    return obj


def resolve(spec: str) -> Callable[..., nn.Module]:
    if ":" not in spec:
        raise InputError(f"--arch '{spec}' must be 'package.module:callable' or 'path/to/file.py:callable'")
    target, attr = spec.rsplit(":", 1)
    if is_file_spec(spec):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"--arch '{spec}': file '{target}' does not exist")
        mod_name = f"harden_arch_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - user code may raise anything
                del sys.modules[mod_name]
                raise InputError(f"--arch '{spec}': importing '{target}' failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise InputError(f"--arch '{spec}': cannot import module '{target}' ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"--arch '{spec}': '{target}' has no callable '{attr}'")
    return fn


def build(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    fn = resolve(spec)
    try:
        net = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        raise InputError(f"--arch '{spec}' with kwargs {kwargs} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"--arch '{spec}' returned {type(net).__name__}, not a torch.nn.Module")
    return net
