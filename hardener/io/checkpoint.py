"""Load base checkpoints; save and load patched checkpoints (one safetensors file + manifest)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import HardenError, InputError, RunError
from ..model import archspec, hf
from ..model.classifier import Classifier, InputSpec
from ..options.validate import regular_input
from ..patches import PATCH_KINDS, PatchedModel
from ..patches.attach import carries_patches
from ..version import __version__
from .manifest import patch_numel, validate_manifest

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
    tensors_sha256: str = ""  # every tensor, patches included (files before 0.1.1 lack it)
    cost: dict[str, Any] = field(default_factory=dict)  # inference cost against the base (cost.Cost.to_json)

    def to_json(self) -> str:  # an empty cost is not written: such files read as before in earlier versions
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "cost" or v}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the checkpoint") -> "Manifest":
        """Parse and validate a manifest: every field typed and bounded, or one InputError naming the field."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError) as e:
            raise InputError(f"{source}: its manifest is not valid JSON ({str(e).splitlines()[0][:80]})") from None

        return cls(**validate_manifest(d, source, FORMAT_VERSION, __version__))


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
    return Manifest.from_json(text, f"'{path}'") if text is not None else None


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


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _open_unnamed(folder: Path) -> int | None:
    """An unnamed file in `folder` (O_TMPFILE): nothing is left behind if the process dies mid-write."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(str(folder), flag | os.O_RDWR, 0o666 & ~current_umask())
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # the filesystem has no O_TMPFILE: fall back to a named temporary file
        raise


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file.

    `write(tmp)` gets a path to write to. Every failure -- OSError (read-only folder, disk full, permission),
    a serializer's own error -- becomes one RunError naming `path` (exit 3), and no temporary file stays.
    Where the filesystem allows, the temporary file has no name until it is complete (a SIGKILL leaves
    nothing); elsewhere it is `.NAME.<pid>.xxxx.tmp`, and stale ones of dead processes are removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp, named = None, None, None
    try:
        fd = _open_unnamed(folder)
        if fd is not None:
            tmp = f"/proc/self/fd/{fd}"
        else:
            _remove_stale_temps(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=str(folder))
            named = tmp
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 files; outputs get the user's umask
        write(tmp)
        if named is not None:  # some writers (safetensors) re-create a named file as 0600
            os.chmod(named, 0o666 & ~current_umask())
        os.fsync(fd)
        if named is None:  # give the complete unnamed file a name, then move it into place
            named = _name_unnamed(fd, tmp, folder, path)
        os.replace(named, path)
        named = None
    except BaseException as e:
        if named is not None:
            Path(named).unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, HardenError)):
            raise
        if isinstance(e, MemoryError):
            raise
        raise RunError(f"cannot write '{path}': {_error_text(e)}") from None
    finally:
        if fd is not None:
            os.close(fd)


def _name_unnamed(fd: int, tmp: str, folder: Path, path: Path) -> str:
    """A name for a complete unnamed file: a hard link where the kernel allows it, else a fast copy."""
    named = str(folder / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.link(tmp, named, follow_symlinks=True)
        return named
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    _remove_stale_temps(path)
    out = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            sent = os.sendfile(out, fd, offset, min(size - offset, 1 << 30))
            if sent == 0:
                raise OSError(errno.EIO, "short copy")
            offset += sent
        os.fsync(out)
    except BaseException:
        os.close(out)
        Path(named).unlink(missing_ok=True)
        raise
    os.close(out)
    return named


def _remove_stale_temps(path: Path) -> None:
    """`.NAME.<pid>.xxxx.tmp` files whose writer no longer runs (killed mid-write)."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        candidates = list(folder.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return
    for f in candidates:
        pid = f.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            f.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file through `atomic_write` (serialized in memory: safetensors' own save_file renames a
    temporary file of its own, which a kill would leave behind)."""
    import safetensors.torch

    def _w(tmp: str) -> None:
        try:
            data = safetensors.torch.save(tensors, metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise RunError(f"cannot write '{path}': {_error_text(e)}") from None
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, _w)


def write_bytes(path: Path, data: bytes) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, _w)


def write_torch(path: Path, obj: Any, jit: bool = False) -> None:
    """torch.save / torch.jit.save through `atomic_write`, serialized in memory first: torch's zip writer
    aborts the whole process (C++ terminate) when the disk fills up under it."""
    import io

    buf = io.BytesIO()
    try:
        (torch.jit.save if jit else torch.save)(obj, buf)
    except Exception as e:  # noqa: BLE001 - serialization errors come in many types
        raise RunError(f"cannot write '{path}': {_error_text(e)}") from None
    write_bytes(path, buf.getvalue())


def save_patched(path: Path, patched, manifest: Manifest) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in patched.base_state_dict().items()}
    manifest.base_tensors_sha256 = tensor_digest(tensors)
    for k, v in patched.patch_state_dict().items():
        tensors[k] = v.detach().cpu().contiguous().clone()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(f"not writing '{path}': tensor '{bad[0]}' holds NaN or inf values (training diverged?)")
    manifest.tensors_sha256 = tensor_digest(tensors)
    write_safetensors(Path(path), tensors, {MANIFEST_KEY: manifest.to_json()})


@dataclass
class ArchChoice:
    spec: str
    kwargs: dict[str, Any]
    trusted_manifest: bool  # the user trusts the manifest's arch and kwargs
    note: str = ""  # why the manifest's kwargs were not used (added to a mismatch error)


def arch_for_manifest(manifest: Manifest, arch: str | None, trust_arch: bool | str | list[str] = False,
                      arch_kwargs: dict | None = None) -> ArchChoice:
    """Which constructor and kwargs build a patched checkpoint's base -- never code the file alone names.

    The user's `arch` wins, with the user's kwargs (the manifest's only when the user trusts the manifest:
    `trust_arch`, or its stored arch under a HARDEN_TRUSTED_ARCH prefix). Without `arch`, the stored arch is
    used only when trusted. `trust_arch` may be True (trust this file's arch) or module prefixes.
    A Hugging Face base (`hf:CLASS`, `hf.build`) is a transformers image-classifier class rebuilt from the recorded
    config, no code: it needs no trust.
    """
    stored = manifest.arch
    if hf.is_hf_arch(arch) or (not arch and hf.is_hf_arch(stored)):
        return ArchChoice(arch or stored, dict(manifest.arch_kwargs if arch_kwargs is None else arch_kwargs), True)
    prefixes = archspec.trusted_prefixes(trust_arch if isinstance(trust_arch, (str, list)) else None)
    trusted = trust_arch is True or (stored is not None and archspec.is_trusted(stored, prefixes))
    if arch:
        if arch_kwargs is not None:
            return ArchChoice(arch, dict(arch_kwargs), trusted)
        if trusted:
            return ArchChoice(arch, dict(manifest.arch_kwargs), True)
        note = ""
        if manifest.arch_kwargs:
            note = (f"; the checkpoint records arch kwargs {json.dumps(manifest.arch_kwargs)[:200]}, used only "
                    "when you repeat them with --arch-kwargs or pass --trust-arch")
        return ArchChoice(arch, {}, False, note)
    if stored and not stored.isprintable():  # a newline in it would forge a line of harden's output
        raise InputError(f"the checkpoint's architecture {ascii(stored[:200])} holds control characters (a damaged "
                         "or crafted file): pass --arch yourself")
    if not stored:
        raise InputError("the checkpoint records no architecture: pass --arch (its constructor, or, for a base that "
                         "was a pickled module, that file with --trust-pickle)")
    if not trusted:
        hint = (f" or add its module to {archspec.TRUST_ENV}" if archspec.module_of(stored) else "")
        raise InputError(f"the checkpoint names its architecture '{stored[:200]}'; harden does not run code a file "
                         f"names: pass --arch (and --arch-kwargs) yourself, or --trust-arch{hint} if you trust it")
    archspec.check_stored(stored)  # paths that name the same file from any directory, checked before any import
    return ArchChoice(stored, dict(manifest.arch_kwargs), True)


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def pickled_arch(spec: str | None) -> bool:
    """`--arch FILE.pt`: the architecture is the whole pickled module in that file (the base a patched checkpoint of
    a pickled model came from), its weights replaced by the checkpoint's."""
    return bool(spec) and ":" not in spec and Path(spec).suffix.lower() in PICKLE_SUFFIXES


def _pickled_skeleton(spec: str, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise InputError(f"--arch '{spec}' is a pickled module: loading it runs its code; pass --trust-pickle if you "
                         "trust the file")
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--arch '{spec}' does not exist (a pickled model file, or package.module:callable)")
    obj, _ = _read_tensors(path, True)
    if not isinstance(obj, nn.Module):
        raise InputError(f"--arch '{spec}' holds tensors, not a pickled nn.Module: pass the constructor instead "
                         "(package.module:callable or path/to/file.py:callable)")
    return obj


def load_patched(path: str | Path, arch: str | None = None, trust_arch: bool | str | list[str] = False,
                 arch_kwargs: dict | None = None, trust_pickle: bool = False):
    """Rebuild a PatchedModel from a harden checkpoint (inputs in [0, 1]); it remembers the architecture it was built
    with (`arch`, `arch_kwargs`), which saving it again records.

    Order: manifest validated -> constructor chosen by the user's trust -> tensors checked against the
    manifest's digests -> sites, names, shapes and values of the patch tensors checked -> loaded."""
    path = regular_input(path, "checkpoint")
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"'{path}' is not a harden-patched checkpoint (no manifest); "
                         "load a plain checkpoint with --arch")
    choice = arch_for_manifest(manifest, arch, trust_arch, arch_kwargs)
    base_sd, patch_sd = _checked_tensors(path, manifest)

    if arch and pickled_arch(arch):
        net = _pickled_skeleton(arch, trust_pickle)
    elif hf.is_hf_arch(choice.spec):
        net = hf.build(choice.spec, choice.kwargs, budget=sum(v.numel() for v in base_sd.values()))
    else:
        net = archspec.build(choice.spec, choice.kwargs, "--arch" if arch else "the checkpoint's arch",
                             allow_dotted=bool(arch))
    net.float()
    try:
        load_state_into(net, base_sd, f"'{path}'")
    except InputError as e:
        raise InputError(e.message + choice.note) from None
    patched = PatchedModel(Classifier(net, InputSpec.from_json(manifest.input)))
    _attach_patches(patched, manifest, patch_sd, path)
    pickled = pickled_arch(choice.spec)
    patched.arch = manifest.arch if pickled else choice.spec
    patched.arch_kwargs = manifest.arch_kwargs if pickled else choice.kwargs
    return patched, manifest


def load_onto(path: str | Path, net: nn.Module):
    """`hardener.load(path, model=net)` (PEFT's `PeftModel.from_pretrained(base, path)`): the patches of a
    harden-patched file attached to `net`, a module the caller built, whose tensors must be the file's base tensors
    bit for bit (else one line says which differs). `net` is used in place: frozen, in eval mode, hooked."""
    path = regular_input(path, "checkpoint")
    manifest = read_manifest(path)
    if manifest is None:
        raise InputError(f"'{path}' is not a harden-patched checkpoint (no manifest): model= takes a patched "
                         "file; load a plain state dict with model.load_state_dict")
    if carries_patches(net):
        raise InputError("model= already carries the patches of a PatchedModel (an earlier hardener.load(..., "
                         "model=it) hooked it): pass a fresh base module")
    base_sd, patch_sd = _checked_tensors(path, manifest)
    _same_base(net, base_sd, path)
    patched = PatchedModel(Classifier(net.eval(), InputSpec.from_json(manifest.input)))
    _attach_patches(patched, manifest, patch_sd, path)
    patched.arch, patched.arch_kwargs = manifest.arch, manifest.arch_kwargs
    return patched, manifest


def _same_base(net: nn.Module, base_sd: dict[str, torch.Tensor], path: Path) -> None:
    """`net`'s tensors are the file's base tensors: the same names, dtypes, shapes and bits."""
    mine = net.state_dict()
    lacks, extra = sorted(set(base_sd) - set(mine)), sorted(set(mine) - set(base_sd))
    what = f"model= is not the base '{path}' was patched from"
    if lacks or extra:
        k = (lacks or extra)[0]
        raise InputError(f"{what}: " + (f"it lacks the file's tensor '{k}'" if lacks else f"it has a tensor '{k}' "
                                        f"the file's base lacks") + f" ({len(lacks)} missing, {len(extra)} extra)")
    for k in sorted(base_sd):
        a, b = mine[k].detach().cpu().contiguous(), base_sd[k].contiguous()
        if a.dtype != b.dtype or a.shape != b.shape:
            show = lambda t: f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}"  # noqa: E731
            raise InputError(f"{what}: tensor '{k}' is {show(a)}, the file's {show(b)}")
        if a.numel() and not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            raise InputError(f"{what}: tensor '{k}' holds other values (build it with the weights the file was "
                             "patched from, or load with arch=)")


def _checked_tensors(path: Path, manifest: Manifest) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A patched file's tensors checked against its manifest's digests and patch sizes: (base, patch tensors)."""
    tensors = read_safetensors(path)
    if manifest.tensors_sha256 and tensor_digest(tensors) != manifest.tensors_sha256:
        raise InputError(f"'{path}': the tensors do not match the manifest's checksum (a corrupted or "
                         "mixed-up file; this is an integrity check, not a signature)")
    base_sd = {k: v for k, v in tensors.items() if not k.startswith("harden.")}
    if manifest.base_tensors_sha256 and tensor_digest(base_sd) != manifest.base_tensors_sha256:
        raise InputError(f"'{path}': the base tensors do not match the manifest's checksum (a corrupted or "
                         "mixed-up file; this is an integrity check, not a signature)")
    patch_sd = {k: v for k, v in tensors.items() if k.startswith("harden.")}
    available = sum(v.numel() for v in patch_sd.values())
    need = 0
    for p in manifest.patches:
        need += patch_numel(p)
        if need > available + (1 << 20):  # bounded by the file's own tensors (names are checked exactly below)
            raise InputError(f"'{path}': manifest patches (up to '{p['site']}') ask for {need:,} values but the "
                             f"file holds {available:,} patch values")
    return base_sd, patch_sd


def _attach_patches(patched, manifest: Manifest, patch_sd: dict[str, torch.Tensor], path: Path) -> None:
    """The manifest's patches rebuilt at their sites of `patched`'s base, their tensors loaded, its route set."""
    modules = dict(patched.net.named_modules())
    for p in manifest.patches:
        kind, site = PATCH_KINDS[p["kind"]], p["site"]
        at_input = kind.placement == "input"
        if at_input != (site == INPUT_SITE_NAME):
            raise InputError(f"'{path}': manifest patch '{p['kind']}' cannot sit at '{site}'"
                             + (" (pre-filters sit at 'input')" if at_input else ""))
        if site != INPUT_SITE_NAME and (site not in modules or site == ""):
            raise InputError(f"'{path}': manifest names site '{site[:100]}', which is not a layer of the model")
        norms = getattr(kind, "norm_types", (nn.modules.batchnorm._BatchNorm,))  # the layers a twin kind copies
        if kind.placement == "bn" and not isinstance(modules[site], norms):
            what = " or ".join(t.__name__.lstrip("_") for t in norms)
            raise InputError(f"'{path}': manifest puts an auxiliary {what} at '{site}', which is a "
                             f"{type(modules[site]).__name__}, not a {what}")
        patched.attach(site, kind.restore(p, modules.get(site)))
    _load_patch_tensors(patched, patch_sd, path)
    patched.set_route(manifest.route)
    patched.eval()


INPUT_SITE_NAME = "input"


def _load_patch_tensors(patched, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Patch tensors: exactly the names and shapes the manifest's specs make, finite, then loaded."""
    expected = patched.patch_state_dict()
    for k, t in expected.items():
        if k not in tensors:
            raise InputError(f"'{path}': patch tensor '{k}' is missing from the file")
        got = tensors[k]
        if tuple(got.shape) != tuple(t.shape):
            raise InputError(f"'{path}': patch tensor '{k}' has shape {tuple(got.shape)}, the manifest's patch "
                             f"spec needs {tuple(t.shape)}")
        if t.is_floating_point() != got.is_floating_point():
            raise InputError(f"'{path}': patch tensor '{k}' has dtype {got.dtype}, expected {t.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise InputError(f"'{path}': patch tensor '{k}' holds NaN or inf values; refusing to load it")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InputError(f"'{path}': tensor '{extra[0]}' belongs to no patch of the manifest")
    patched.load_patch_state_dict(tensors)


def _record(record: Any) -> dict:
    """A run's training record (`training.record.TrainingRecord`) as the manifest stores it; none: {}."""
    return record.to_dict() if hasattr(record, "to_dict") else dict(record or {})


def save_patched_model(patched: PatchedModel, path: str | Path, arch: str | None = None,
                       arch_kwargs: dict | None = None) -> None:
    """`PatchedModel.save`: the base's tensors, the patches and the manifest (architecture, input, patch specs,
    training record, route, counted cost), written atomically from CPU copies."""
    base = {k: v.detach().cpu().contiguous() for k, v in patched.base_state_dict().items()}
    arch = arch or patched.arch
    if not arch:
        warnings.warn(f"'{path}' is saved without an architecture: load it with hardener.load(path, model=<the base "
                      "module, built as before>) or pass arch='package.module:callable' (to save() or hardener.patch)",
                      UserWarning, stacklevel=3)
    manifest = Manifest(arch=arch, arch_kwargs=arch_kwargs or patched.arch_kwargs or {},
                        input=patched.model.spec.to_json(), patches=patched.patch_specs(),
                        base_sha256=patched.base_sha256 or tensor_digest(base),
                        training=_record(patched.training_record), route=patched.current_route,
                        cost=patched.cost.to_json(latency=False) if patched.cost is not None else {})
    device = next(iter(patched.parameters()), torch.empty(0)).device
    save_patched(Path(path), patched.to("cpu"), manifest)
    patched.to(device)
