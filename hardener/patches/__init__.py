"""Patch kinds, looked up by name."""
from __future__ import annotations

from .attach import PatchedModel, parse_sites, select_sites
from .fixer import ACTIVATIONS, Fixer, FixerConfig

PATCH_KINDS = {"fixer": Fixer}

__all__ = ["ACTIVATIONS", "Fixer", "FixerConfig", "PATCH_KINDS", "PatchedModel", "parse_sites", "select_sites"]
