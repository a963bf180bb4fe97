"""What `harden patch --method ... [--preset ...]` asks for, checked before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .fit import FULL_METHODS
from .patches import SITE_KINDS

METHOD_CHOICES = (*SITE_KINDS, "auxbn", *FULL_METHODS)


@dataclass
class Methods:
    site_kind: str | None  # fixer | denoise | prefilter: the kind of --at sites without a KIND: prefix
    auxbn: bool  # auxiliary BN twins on the --bn layers
    full: str | None  # adv-train | advprop | advamd: fine-tune every base weight (not a patch)

    @property
    def fit_method(self) -> str:
        return self.full or "patch"


def parse_methods(text: str, bn: str | None, at: str | None) -> Methods:
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in METHOD_CHOICES]
    if unknown or not parts:
        raise InputError(f"unknown --method '{', '.join(unknown) or text}' (choose from {', '.join(METHOD_CHOICES)}; "
                         "combine patch kinds with commas, e.g. fixer,auxbn)")
    full = [p for p in parts if p in FULL_METHODS]
    kinds = [p for p in parts if p in SITE_KINDS]
    if full and (len(parts) > 1 + ("auxbn" in parts)):
        raise InputError(f"--method {full[0]} fine-tunes the whole model and cannot be combined with "
                         f"{', '.join(p for p in parts if p not in full and p != 'auxbn')}")
    if len(kinds) > 1:
        raise InputError(f"--method names two site kinds ({', '.join(kinds)}): give one, and put others on --at "
                         "as KIND:SITE")
    auxbn = "auxbn" in parts or bn is not None or (bool(full) and full[0] in ("advprop", "advamd"))
    if full and full[0] == "adv-train" and auxbn:
        raise InputError("--method adv-train fine-tunes the base's own BNs: drop auxbn / --bn")
    if full and at:
        raise InputError(f"--method {full[0]} fine-tunes the whole model: --at sites do not apply")
    site_kind = kinds[0] if kinds else ("fixer" if not full and not auxbn else None)
    if site_kind is None and at and not full:
        site_kind = "fixer"  # --at without a site kind in --method: fixers, as before
    return Methods(site_kind, auxbn, full[0] if full else None)


# Measured recipes (bench/RESULTS.md, "White-box robustness with a frozen base"). Keys are `harden patch`
# option names; options given on the command line or in harden.toml win over them. Sites are generic -- a
# pre-filter at the model input, a fixer after the stem and fixers at the suggested sites -- so a preset fits
# any model; on the Fashion-MNIST example it resolves to input, prep, layer1, layer2 (run r4 of the table).
PRESETS: dict[str, dict] = {
    "robust": {
        "method": "fixer", "at": "prefilter:input,stem,auto", "width": 64, "rho": 1.0,
        "adversary": "patched", "attack_name": "pgd", "steps": 5, "loss_name": "fixer",
        "mu": 1.0, "lam": 0.0, "epochs": 10, "select_on": 500,
    },
}
