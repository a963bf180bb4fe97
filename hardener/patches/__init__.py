"""Patch kinds, looked up by name."""
from __future__ import annotations

from .attach import INPUT_SITE, ROUTES, PatchedModel, parse_sites, select_sites
from .auxbn import AuxBN, bn_names, select_bn_sites
from .denoise import OPS as DENOISE_OPS, Denoise, DenoiseConfig
from .fixer import ACTIVATIONS, Fixer, FixerConfig
from .prefilter import Prefilter

PATCH_KINDS = {"fixer": Fixer, "denoise": Denoise, "prefilter": Prefilter, "auxbn": AuxBN}
SITE_KINDS = ("fixer", "denoise", "prefilter")  # kinds placed with --at (auxbn goes on BatchNorms with --bn)

__all__ = ["ACTIVATIONS", "AuxBN", "DENOISE_OPS", "Denoise", "DenoiseConfig", "Fixer", "FixerConfig", "INPUT_SITE",
           "PATCH_KINDS", "PatchedModel", "Prefilter", "ROUTES", "SITE_KINDS", "bn_names", "parse_sites",
           "select_bn_sites", "select_sites"]
