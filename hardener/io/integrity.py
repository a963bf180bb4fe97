"""Integrity of the files harden writes for itself and reads back: resume states, base caches, adversarial examples.

Each carries a sha256 over the run's fingerprint (what options, data and model the file belongs to) and its
content (every tensor's dtype, shape and bytes, and every other value, in a fixed order), computed once when it
is written and once when it is read. A file whose digest does not match -- edited, truncated, from another run,
or from a version that wrote none -- is an `InputError` naming the file and what to do, never numbers used
unchecked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

DIGEST_KEY = "harden_digest"  # in a state dict, or in a .safetensors file's metadata
FINGERPRINT_KEY = "fingerprint"


class Mismatch(Exception):
    """The content cannot be digested (a tensor of a kind harden never writes, a value of an unknown type)."""


def _feed(h, obj: Any) -> None:
    """Hash `obj` (nested dicts, lists and tuples of tensors and plain values) in a fixed order."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_nested or obj.is_quantized or obj.device.type == "meta":
            raise Mismatch(f"a {obj.layout} tensor")
        t = obj.detach().cpu().contiguous()  # a copy only where the tensor is not contiguous or not on the CPU
        h.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer: no copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            h.update(f"{type(k).__name__}:{k!r}=".encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "biufc":
        a = np.ascontiguousarray(obj)
        h.update(f"N|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    else:
        raise Mismatch(f"a value of type {type(obj).__name__}")


def digest(fingerprint: str, content: Any) -> str:
    """sha256 over the run's fingerprint and `content` (a state dict, or a {name: tensor} dict)."""
    h = hashlib.sha256(f"harden-integrity/1|{fingerprint}|".encode())
    _feed(h, content)
    return h.hexdigest()


def seal(state: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """`state` with its digest added (under DIGEST_KEY), to be written as it is."""
    return {**state, DIGEST_KEY: digest(fingerprint, state)}


def file_digest(path: Path, fingerprint: str) -> str:
    """sha256 over the run's fingerprint and a file's bytes, read in chunks (a spilled array on disk)."""
    h = hashlib.sha256(f"harden-integrity/1|{fingerprint}|".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse(path: Path, what: str, why: str, todo: str) -> InputError:
    return InputError(f"{what} '{path}' {why}: {todo}")


def check(state: Any, path: Path, fingerprint: str, what: str, todo: str, other_run: str = "") -> dict[str, Any]:
    """A state read back, its digest checked against this run's fingerprint; the state without its digest.

    `other_run`: the message for a file whose recorded fingerprint is not this run's (default: the generic one)."""
    if not isinstance(state, dict):
        raise refuse(path, what, "is not a file harden wrote", todo)
    if DIGEST_KEY not in state:
        raise refuse(path, what, NO_DIGEST, todo)
    body = {k: v for k, v in state.items() if k != DIGEST_KEY}
    if FINGERPRINT_KEY in body and body[FINGERPRINT_KEY] != fingerprint:
        raise InputError(other_run) if other_run else refuse(path, what, OTHER_RUN, todo)
    _check_digest(path, what, todo, fingerprint, body, state[DIGEST_KEY])
    return body


NO_DIGEST = "has no integrity digest (written by an older harden version; it can be deleted)"
OTHER_RUN = "belongs to another run (other model, data or options)"


def _check_digest(path: Path, what: str, todo: str, fingerprint: str, content: Any, stored: str) -> None:
    """The content's digest against the one stored with it (a content that cannot be digested does not match)."""
    try:
        ok = digest(fingerprint, content) == stored
    except Mismatch:
        ok = False
    if not ok:
        raise refuse(path, what, "does not match its integrity digest (edited, damaged, or from another run)", todo)


def safetensors_metadata(fingerprint: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata that seals a .safetensors file of tensors to this run."""
    return {FINGERPRINT_KEY: fingerprint, DIGEST_KEY: digest(fingerprint, tensors)}


def read_safetensors(path: Path, fingerprint: str, what: str, todo: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file harden wrote, checked against its digest and this run's fingerprint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on damaged files
        raise refuse(path, what, f"cannot be read ({str(e).splitlines()[0][:120]})", todo) from None
    if DIGEST_KEY not in meta:
        raise refuse(path, what, NO_DIGEST, todo)
    if meta.get(FINGERPRINT_KEY) != fingerprint:
        raise refuse(path, what, OTHER_RUN, todo)
    _check_digest(path, what, todo, fingerprint, tensors, meta[DIGEST_KEY])
    return tensors


def tag_text(fingerprint: str, file_digest_: str) -> str:
    """The completion tag of a spilled array: the run's fingerprint and the digest of the array's file."""
    return json.dumps({FINGERPRINT_KEY: fingerprint, DIGEST_KEY: file_digest_}, sort_keys=True)


def check_tag(tag: Path, data: Path, fingerprint: str, what: str, todo: str) -> None:
    """A spilled array's completion tag checked against this run and the array file's bytes."""
    try:
        text = tag.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise refuse(tag, what, f"cannot be read ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
                     todo) from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        meta = None  # older versions wrote the bare fingerprint
    if not isinstance(meta, dict) or DIGEST_KEY not in meta:
        raise refuse(data, what, f"has no integrity digest in its tag '{tag.name}' (written by an older harden "
                                 "version, or damaged; both can be deleted)", todo)
    if meta.get(FINGERPRINT_KEY) != fingerprint:
        raise refuse(data, what, OTHER_RUN, todo)
    try:
        ok = file_digest(data, fingerprint) == meta[DIGEST_KEY]
    except OSError as e:
        raise refuse(data, what, f"cannot be read ({e.strerror or e})", todo) from None
    if not ok:
        raise refuse(data, what, "does not match its integrity digest (edited, damaged, or from another run)", todo)
