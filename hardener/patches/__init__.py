"""Patch kinds, looked up by name: one module each, behind the contract of `base.py`; where they go (`sites.py`);
how they are hooked into a frozen base (`attach.py`). The order of the imports below is the order of the
`--method` choices."""
from __future__ import annotations

from .attach import ROUTES, PatchedModel
from .auxbn import AuxBN, AuxLN
from .base import (
    DEFAULT_BN_KIND,
    DEFAULT_SITE_KIND,
    INPUT_SITE,
    KINDS,
    PatchKind,
    Site,
    bn_kinds,
    register_patch_kind,
    site_kinds,
)
from .denoise import OPS as DENOISE_OPS
from .denoise import Denoise, DenoiseConfig
from .fixer import ACTIVATIONS, Fixer, FixerConfig, TokenFixer
from .lora import Lora
from .prefilter import Prefilter, PrefilterConfig
from .sites import (
    Suggestion,
    bn_names,
    ln_names,
    parse_sites,
    select_bn_sites,
    select_sites,
    suggest,
    suggest_sites,
)

PATCH_KINDS = KINDS  # the registry itself: kinds registered later show up here too

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_BN_KIND",
    "DEFAULT_SITE_KIND",
    "DENOISE_OPS",
    "INPUT_SITE",
    "KINDS",
    "PATCH_KINDS",
    "ROUTES",
    "AuxBN",
    "AuxLN",
    "Denoise",
    "DenoiseConfig",
    "Fixer",
    "FixerConfig",
    "Lora",
    "PatchKind",
    "PatchedModel",
    "Prefilter",
    "PrefilterConfig",
    "Site",
    "Suggestion",
    "TokenFixer",
    "bn_kinds",
    "bn_names",
    "ln_names",
    "parse_sites",
    "register_patch_kind",
    "select_bn_sites",
    "select_sites",
    "site_kinds",
    "suggest",
    "suggest_sites",
]
