"""harden: harden frozen PyTorch classifiers against adversarial examples with small patches."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, arch=None, trust_arch=False, arch_kwargs=None):
    """Load a harden-patched checkpoint as an nn.Module that takes [0, 1] pixels and returns logits.

    The returned `PatchedModel` has `patches_disabled()` (the base, exactly), `set_strength()`, and for
    auxiliary BNs `route("adv"|"main")` (a context manager; `set_route` changes the default, which the
    checkpoint stores); `model.manifest` holds the checkpoint's manifest.
    Loading never imports or calls code the file names (README, "Security model"): `arch` (with
    `arch_kwargs`) names the architecture (`package.module:callable` or `file.py:callable`); the
    architecture stored in the checkpoint, with its kwargs, is used only with `trust_arch=True` or when
    its module lies under a prefix of `trust_arch="pkg,other.pkg"` or of the HARDEN_TRUSTED_ARCH
    environment variable. The checkpoint's tensors are checked against its manifest's checksums.
    """
    from .checkpoint import load_patched

    patched, manifest = load_patched(path, arch=arch, trust_arch=trust_arch, arch_kwargs=arch_kwargs)
    patched.manifest = manifest
    return patched


__all__ = ["__version__", "load"]
