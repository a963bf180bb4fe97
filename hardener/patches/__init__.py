"""Patch kinds, looked up by name."""
from __future__ import annotations

from .attach import PatchedModel, parse_sites, select_sites
from .denoise import OPS as DENOISE_OPS, Denoise, DenoiseConfig
from .fixer import ACTIVATIONS, Fixer, FixerConfig

PATCH_KINDS = {"fixer": Fixer, "denoise": Denoise}

__all__ = ["ACTIVATIONS", "DENOISE_OPS", "Denoise", "DenoiseConfig", "Fixer", "FixerConfig", "PATCH_KINDS",
           "PatchedModel", "parse_sites", "select_sites"]
