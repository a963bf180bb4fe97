"""Load base checkpoints; save and load patched checkpoints (one safetensors file + manifest)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, archspec
from .errors import InputError, RunError
from .model import Classifier, InputSpec

FORMAT_VERSION = 1
MANIFEST_KEY = "harden"
PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Manifest:
    arch: str | None
    arch_kwargs: dict[str, Any]
    input: dict[str, Any]
    patches: list[dict[str, Any]]
    base_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    base_tensors_sha256: str = ""
    route: str = "adv"  # default inference route of auxiliary BNs
    base_modified: bool = False  # full fine-tuning: the base tensors are not the parent's
    parent_sha256: str = ""  # the checkpoint a base-modifying method started from
    format_version: int = FORMAT_VERSION
    harden_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"checkpoint format {d['format_version']} is newer than this harden "
                             f"({__version__}) can read: upgrade harden")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class LoadedBase:
    net: nn.Module
    path: Path
    sha256: str
    arch: str | None
    arch_kwargs: dict[str, Any]
    metadata: dict[str, str]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror}") from None
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest | None:
    """The harden manifest of a .safetensors file, or None for a plain checkpoint."""
    if path.suffix.lower() != ".safetensors":
        return None
    meta = _safetensors_metadata(path)
    text = meta.get(MANIFEST_KEY)
    return Manifest.from_json(text) if text else None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on bad headers
        raise InputError(f"'{path}' is not a valid .safetensors file ({str(e).splitlines()[0]})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a truncated or corrupted file is an input error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on damaged files
        raise InputError(f"'{path}' is a damaged .safetensors file ({str(e).splitlines()[0]}); "
                         "copy or download it again") from None


def tensor_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors: the integrity check of a patched file's base."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_tensors(path: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor] | nn.Module, dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = _safetensors_metadata(path)
        return read_safetensors(path), meta
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise InputError(f"'{path}': unsupported checkpoint type '{suffix}' (use .safetensors, .pt or .pth)")
    _sniff_torch_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise InputError(f"'{path}' holds pickled code, not just tensors (a whole nn.Module?): load it "
                             "only if you trust it, with --trust-pickle") from None
        raise InputError(f"'{path}' is not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ModuleNotFoundError) as e:
        raise InputError(f"'{path}' is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, nn.Module):
        return obj, {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, {}
    raise InputError(f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors")


def _sniff_torch_file(path: Path) -> None:
    """A torch file is a zip archive (PK) or a legacy pickle (0x80): anything else is named as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror}") from None
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return
    text = head.lstrip().lower()
    what = "an HTML page (a failed download?)" if text.startswith((b"<!doctype html", b"<html")) else \
        "empty" if not head else f"a file starting with {head[:16]!r}"
    raise InputError(f"'{path}' is not a PyTorch checkpoint: it is {what}")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_state_into(net: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"{what} does not match the architecture: keys {'; '.join(parts)} "
                         "(is --arch / --arch-kwargs right?)")
    wrong = [k for k in expected if expected[k].is_floating_point() and not sd[k].is_floating_point()]
    if wrong:
        k = wrong[0]
        raise InputError(f"{what}: tensor '{k}' has dtype {sd[k].dtype} where the model needs floating point "
                         f"({len(wrong)} such tensors): the checkpoint is quantised or damaged")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise InputError(f"{what} does not match the architecture: '{k}' has shape {tuple(sd[k].shape)} in the "
                         f"checkpoint but {tuple(expected[k].shape)} in the model ({len(bad)} such tensors; "
                         "is --arch-kwargs right?)")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(sd[k])  # casts fp16/bf16 to the model's fp32


def load_base(path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None,
              trust_pickle: bool = False) -> LoadedBase:
    """Load a plain (unpatched) checkpoint into a frozen fp32 module."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist")
    kwargs = dict(arch_kwargs or {})
    obj, meta = _read_tensors(path, trust_pickle)
    if MANIFEST_KEY in meta:
        raise InputError(f"'{path}' is already a harden-patched checkpoint; patch its base instead, "
                         "or evaluate it with `harden eval`")
    if isinstance(obj, nn.Module):
        net = obj.float()
        arch = arch or None
    else:
        if not arch:
            raise InputError(f"'{path}' is a state dict: pass --arch package.module:callable or "
                             "path/to/file.py:callable naming the model constructor")
        net = archspec.build(arch, kwargs)
        net.float()
        load_state_into(net, strip_prefixes(obj), f"'{path}'")
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    return LoadedBase(net, path, sha256_file(path), arch, kwargs, meta)


# ---------------------------------------------------------------- patched checkpoints


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent or "."))
    try:  # mkstemp makes 0600 files; the output gets what open() would give it under the user's umask
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # some writers (safetensors) re-create the file as 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise RunError(f"cannot write '{path}': {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_patched(path: Path, patched, manifest: Manifest) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in patched.base_state_dict().items()}
    manifest.base_tensors_sha256 = tensor_digest(tensors)
    for k, v in patched.patch_state_dict().items():
        tensors[k] = v.detach().cpu().contiguous().clone()
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={MANIFEST_KEY: manifest.to_json()}))


def _arch_for_manifest(manifest: Manifest, arch: str | None, trust_arch: bool) -> str:
    stored = manifest.arch
    if arch:
        return arch
    if not stored:
        raise InputError("the checkpoint records no architecture: pass --arch")
    if archspec.is_file_spec(stored) and not trust_arch:
        raise InputError(f"the checkpoint names its architecture by a file path ('{stored}'); harden imports "
                         "such code only when you repeat it with --arch or pass --trust-arch")
    return stored


def load_patched(path: str | Path, arch: str | None = None, trust_arch: bool = False,
                 arch_kwargs: dict | None = None):
    """Rebuild a PatchedModel from a harden checkpoint (inputs in [0, 1])."""
    from .patches import PATCH_KINDS, PatchedModel

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist")
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"'{path}' is not a harden-patched checkpoint (no manifest); "
                         "load a plain checkpoint with --arch")
    spec = _arch_for_manifest(manifest, arch, trust_arch)
    net = archspec.build(spec, arch_kwargs if arch_kwargs is not None else manifest.arch_kwargs)
    net.float()
    tensors = read_safetensors(path)
    base_sd = {k: v for k, v in tensors.items() if not k.startswith("harden.")}
    if manifest.base_tensors_sha256 and tensor_digest(base_sd) != manifest.base_tensors_sha256:
        raise InputError(f"'{path}': the base tensors do not match the manifest's checksum (a corrupted or "
                         "mixed-up file; this is an integrity check, not a signature)")
    load_state_into(net, base_sd, f"'{path}'")
    model = Classifier(net, InputSpec.from_json(manifest.input))
    patched = PatchedModel(model)
    for p in manifest.patches:
        kind = PATCH_KINDS.get(p["kind"])
        if kind is None:
            raise InputError(f"'{path}' uses patch kind '{p['kind']}', unknown to harden {__version__}")
        patched.attach(p["site"], kind.from_spec(p))
    patched.load_patch_state_dict(tensors)
    patched.set_route(manifest.route)
    patched.eval()
    return patched, manifest
