"""The manifest of a patched checkpoint, checked field by field before anything is built from it: the input spec,
each patch spec (the fields its kind declares, `spec_fields`), and the whole manifest. Above `patches` (a patch spec
names a kind) and below `checkpoint` (which reads and writes the file)."""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..options.validate import (
    HEX64,
    MAX_CHANNELS,
    MAX_PATCHES,
    MAX_TEXT,
    _Fields,
    _int_in,
    _is_int,
    _is_num,
    _opt,
    _text,
)
from ..patches import PATCH_KINDS


def _hex_or_empty(v: Any) -> bool:
    return isinstance(v, str) and (v == "" or bool(HEX64.fullmatch(v)))


def _num_list(n_max: int, positive: bool = False):
    return lambda v: (isinstance(v, list) and 1 <= len(v) <= n_max
                      and all(_is_num(x) and (x > 0 or not positive) for x in v))


def validate_input(d: Any, source: str) -> dict:
    f = _Fields(d, "input", source)
    f.known({"shape", "mean", "std", "classes", "num_classes", "logits", "preprocessing"})
    out = {
        "shape": f.get("shape", _opt(lambda v: isinstance(v, list) and len(v) == 3
                                     and all(_is_int(x) and 1 <= x <= MAX_CHANNELS for x in v)
                                     and v[0] * v[1] * v[2] <= 1 << 28),
                       "must be null or [C, H, W] of positive integers", None),
        "mean": f.get("mean", _opt(_num_list(4096)), "must be null or a list of finite numbers", None),
        "std": f.get("std", _opt(_num_list(4096, positive=True)), "must be null or a list of positive numbers",
                     None),
        "classes": f.get("classes", _opt(lambda v: isinstance(v, list) and len(v) <= 1 << 20
                                         and all(isinstance(c, str) and len(c) <= MAX_TEXT for c in v)),
                         "must be null or a list of strings", None),
        "num_classes": f.get("num_classes", _opt(_int_in(1, 1 << 24)), "must be null or a positive integer", None),
        "logits": f.get("logits", _opt(lambda v: _text(200)(v) or _int_in(-1000, 1000)(v)),
                        "must be null, a key or an index", None),
        "preprocessing": f.get("preprocessing", lambda v: isinstance(v, list) and all(_text()(x) for x in v),
                               "must be a list of strings", []),
    }
    if out["logits"] is not None:
        out["logits"] = str(out["logits"])
    return out


def validate_patch(d: Any, i: int, source: str) -> dict:
    """One manifest patch spec: its kind, its site, then the fields its kind declares (`spec_fields`)."""
    f = _Fields(d, f"patches[{i}]", source)
    kind = f.get("kind", lambda v: isinstance(v, str) and v in PATCH_KINDS,
                 f"must be one of {', '.join(PATCH_KINDS)}", required=True)
    site = f.get("site", lambda v: isinstance(v, str) and 0 < len(v) <= MAX_TEXT, "must be a layer name",
                 required=True)
    fields = PATCH_KINDS[kind].spec_fields()
    f.known({"kind", "site", *fields})
    out = {"kind": kind, "site": site}
    for key, (check, what, *default) in fields.items():
        out[key] = f.get(key, check, what, default[0] if default else ...)
    return out


def patch_numel(spec: dict) -> int:
    """Elements of the tensors a patch spec asks for, computed without allocating them (the kind's `numel`)."""
    return PATCH_KINDS[spec["kind"]].numel(spec)


MANIFEST_FIELDS = {"arch", "arch_kwargs", "input", "patches", "base_sha256", "training", "base_tensors_sha256",
                   "route", "base_modified", "parent_sha256", "format_version", "harden_version",
                   "tensors_sha256", "cost"}


def validate_manifest(d: Any, source: str, newest: int, version: str) -> dict:
    """The constructor arguments of `checkpoint.Manifest` from a parsed manifest, every field checked."""
    f = _Fields(d, "", source)
    fv = f.get("format_version", _int_in(0, 1 << 30), "must be a non-negative integer", 0)
    if fv > newest:
        raise InputError(f"checkpoint format {fv} is newer than this harden ({version}) can read: upgrade harden")
    f.known(MANIFEST_FIELDS)
    patches = f.get("patches", lambda v: isinstance(v, list) and len(v) <= MAX_PATCHES,
                    f"must be a list of at most {MAX_PATCHES} patches", required=True)
    out = {
        "arch": f.get("arch", _opt(lambda v: _text()(v) and v != ""), "must be null or a 'module:callable' string",
                      required=True),
        "arch_kwargs": f.get("arch_kwargs", lambda v: isinstance(v, dict), "must be a JSON object", {}),
        "input": validate_input(f.get("input", lambda v: isinstance(v, dict), "must be a JSON object",
                                      required=True), source),
        "patches": [validate_patch(p, i, source) for i, p in enumerate(patches)],
        "base_sha256": f.get("base_sha256", _text(128), "must be a string", required=True),
        "training": f.get("training", lambda v: isinstance(v, dict), "must be a JSON object", {}),
        "base_tensors_sha256": f.get("base_tensors_sha256", _hex_or_empty, "must be a sha256 hex digest", ""),
        "tensors_sha256": f.get("tensors_sha256", _hex_or_empty, "must be a sha256 hex digest", ""),
        "parent_sha256": f.get("parent_sha256", _text(128), "must be a string", ""),
        "route": f.get("route", lambda v: isinstance(v, str) and v in ("adv", "main"), "must be 'adv' or 'main'", "adv"),
        "base_modified": f.get("base_modified", lambda v: isinstance(v, bool), "must be true or false", False),
        "harden_version": f.get("harden_version", _text(64), "must be a string", "?"),
        "format_version": fv,
        "cost": f.get("cost", lambda v: isinstance(v, dict), "must be a JSON object", {}),
    }
    sites = [p["site"] for p in out["patches"]]
    dup = next((s for s in sites if sites.count(s) > 1), None)
    if dup is not None:
        raise InputError(f"{source}: manifest lists two patches at site '{dup}'")
    return out
