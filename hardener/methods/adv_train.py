"""Adversarial training of the whole model (Madry et al. 2018; with `--loss trades`, TRADES): every base weight
changes, the result is a new base, not a patch. The adversary is the model being trained, every step; the loss is
the patch method's (CE or TRADES on clean + adversarial pairs, plus μ · KL to the original base's logits)."""
from __future__ import annotations

from ..options.choices import Adversary
from .base import register_method
from .patch import PairConfig, PatchTraining


@register_method("adv-train", config_cls=PairConfig)
class AdvTrain(PatchTraining):
    trains_base = True
    auxbn = "forbidden"  # it fine-tunes the base's own BNs
    default_lr = 1e-3

    def adversary(self) -> str:
        return Adversary.NOISE if self.cfg.noise_sigma else Adversary.PATCHED
