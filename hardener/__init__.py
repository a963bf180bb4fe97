"""harden: harden frozen PyTorch classifiers against adversarial examples with small patches."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, arch=None, trust_arch=False):
    """Load a harden-patched checkpoint as an nn.Module that takes [0, 1] pixels and returns logits.

    The returned `PatchedModel` has `patches_disabled()` (the base, exactly) and `set_strength()`.
    `arch` repeats the architecture (`package.module:callable` or `file.py:callable`); a file path
    stored in the checkpoint is imported only when repeated here or with `trust_arch=True`.
    """
    from .checkpoint import load_patched

    patched, _ = load_patched(path, arch=arch, trust_arch=trust_arch)
    return patched


__all__ = ["__version__", "load"]
