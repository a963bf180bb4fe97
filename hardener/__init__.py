"""harden: harden frozen PyTorch classifiers against adversarial examples with small patches."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, arch=None, trust_arch=False):
    """Load a harden-patched checkpoint as an nn.Module that takes [0, 1] pixels and returns logits.

    The returned `PatchedModel` has `patches_disabled()` (the base, exactly), `set_strength()`, and for
    auxiliary BNs `route("adv"|"main")` (a context manager; `set_route` changes the default, which the
    checkpoint stores); `model.manifest` holds the checkpoint's manifest.
    `arch` repeats the architecture (`package.module:callable` or `file.py:callable`); a file path
    stored in the checkpoint is imported only when repeated here or with `trust_arch=True`.
    """
    from .checkpoint import load_patched

    patched, manifest = load_patched(path, arch=arch, trust_arch=trust_arch)
    patched.manifest = manifest
    return patched


__all__ = ["__version__", "load"]
