"""harden: harden frozen PyTorch classifiers against adversarial examples with small patches."""
from __future__ import annotations

from .version import __version__


def load(path, arch=None, trust_arch=False, arch_kwargs=None, mean=None, std=None, model=None):
    """Load a checkpoint as an nn.Module that takes [0, 1] pixels and returns logits: a harden-patched file, or a
    plain state dict (built with `arch`, normalised with `mean`/`std`; it comes back with no patches, ready for
    `hardener.patch`).

    `model=module` (PEFT's `PeftModel.from_pretrained(base, path)`): a patched file's patches attached to a base
    module you built, with the file's normalisation; its weights must be the file's base weights, bit for bit.
    The module is used in place (frozen, in eval mode, hooked), and no constructor is looked up.

    The returned `PatchedModel` has `patches_disabled()` (the base, exactly), `set_strength()`, and for
    auxiliary BNs `route("adv"|"main")` (a context manager; `set_route` changes the default, which the
    checkpoint stores); `model.manifest` holds the checkpoint's manifest; `save()` records the architecture again.
    Loading never imports or calls code the file names (docs/reliability.md, "Security model"): `arch` (with
    `arch_kwargs`) names the architecture (`package.module:callable` or `file.py:callable`); the
    architecture stored in the checkpoint, with its kwargs, is used only with `trust_arch=True` or when
    its module lies under a prefix of `trust_arch="pkg,other.pkg"` or of the HARDEN_TRUSTED_ARCH
    environment variable. The checkpoint's tensors are checked against its manifest's checksums.
    """
    import os
    from pathlib import Path

    from .errors import InputError
    from .io.checkpoint import load_onto, load_patched, read_manifest
    from .options.validate import check_arg
    from .options.wording import speaking_python

    with speaking_python({"arch": None, "trust_arch": False, "arch_kwargs": None, "mean": None, "std": None,
                          "model": None}):
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a checkpoint's file path (str or Path), got {type(path).__name__}")
        check_arg("arch", arch, "str | None")
        check_arg("arch_kwargs", arch_kwargs, "dict | None")
        check_arg("trust_arch", trust_arch, "bool | str | list")
        if isinstance(trust_arch, list) and not all(isinstance(p, str) for p in trust_arch):
            raise InputError("trust_arch must be True, a comma list of module prefixes or a list of them (strings)")
        if arch_kwargs is not None and not all(isinstance(k, str) for k in arch_kwargs):
            raise InputError("arch_kwargs must map keyword names (strings) to values")

        if model is not None:
            import torch

            if not isinstance(model, torch.nn.Module):
                raise InputError(f"model must be the base nn.Module you built, got {type(model).__name__}")
            given = [n for n, v in (("arch", arch), ("arch_kwargs", arch_kwargs), ("mean", mean), ("std", std)) if v]
            if given:
                raise InputError(f"give model= or {given[0]}=, not both: with model= the base is the module you built "
                                 "and the normalisation is the file's")
            patched, manifest = load_onto(path, model)
        elif Path(path).is_file() and read_manifest(Path(path)) is None:
            import json

            from .api import as_patched

            kwargs = json.dumps(arch_kwargs) if arch_kwargs else None
            patched, manifest = as_patched(str(path), arch, mean, std, arch_kwargs=kwargs), None
        else:
            patched, manifest = load_patched(path, arch=arch, trust_arch=trust_arch, arch_kwargs=arch_kwargs)
        patched.manifest = manifest
        return patched


def __getattr__(name):
    """`hardener.patch`, `hardener.evaluate`, `hardener.PatchedModel`, `hardener.attacks`, ... imported on first use
    (keeps `import hardener` and the CLI's start fast: no torch until one is used)."""
    import importlib

    if name in ("patch", "evaluate", "certify", "layers", "as_dataset", "as_patched", "PatchOptions", "Report",
                "Layers"):
        return getattr(importlib.import_module(".api", __name__), name)
    if name == "measure_cost":
        return importlib.import_module(".patches.cost", __name__).measure
    if name == "Certification":
        return importlib.import_module(".certification.run", __name__).Certification
    if name == "PatchedModel":
        return importlib.import_module(".patches", __name__).PatchedModel
    if name in ("attacks", "errors", "data", "methods", "patches", "stats"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hardener' has no attribute '{name}'")


def __dir__():
    """The public names (what `hardener.<TAB>` offers), the lazily imported ones included, and the module's dunders."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


__all__ = ["__version__", "load", "patch", "evaluate", "certify", "layers", "as_dataset", "as_patched", "PatchOptions",
           "PatchedModel", "Report", "Certification", "Layers", "measure_cost", "attacks", "data", "errors", "methods",
           "patches", "stats"]
