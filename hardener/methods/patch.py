"""Patches on a frozen base (fixer paper §3.2): only patch parameters get gradients.

The second input is an adversarial example of the frozen base (`--adversary base`: the transfer setting of the
paper) or of the patched model itself (`--adversary patched`: adaptive), or Gaussian noise (`--noise-sigma`).
Loss per batch: CE on the clean input plus the adversarial term `--loss` names (`fixer`: focal CE on the
adversarial input; `trades`: β · KL(clean ‖ adversarial), Zhang et al. 2019), or with `rslad` a robust teacher's
soft labels on the clean input as the target of both inputs instead of CE (`--teacher`; Zi et al. 2021, RSLAD:
w · KL(T(x) ‖ S(x_adv)) + (1 − w) · KL(T(x) ‖ S(x)), w = 5/6), plus the distillation terms of the
trainer (λ: features after each patch against the base's features of the clean input, for both inputs; μ: KL to
the base logits on the clean input). With noise, the stability objective CE(f(D(x + δ)), f(x)'s class) replaces
both CE terms (denoised smoothing, Salman et al. 2020). Auxiliary BNs are trained on route `adv` with every input:
at inference nothing knows which inputs are adversarial.
"""
from __future__ import annotations

import torch

from ..options.choices import Adversary
from ..options.kind_options import PairConfig
from . import losses
from .base import DEFAULT_METHOD, Batch, Method, register_method


def _adv_ce(out_adv: torch.Tensor, out_clean: torch.Tensor, y: torch.Tensor, gamma: float,
            beta: float) -> torch.Tensor:
    return losses.focal_ce(out_adv, y, gamma)


def _adv_trades(out_adv: torch.Tensor, out_clean: torch.Tensor, y: torch.Tensor, gamma: float,
                beta: float) -> torch.Tensor:
    return beta * losses.trades_kl(out_adv, out_clean)


ADV_LOSSES = {"fixer": _adv_ce, "trades": _adv_trades}  # the adversarial term of the loss, by --loss
LOSSES = (*ADV_LOSSES, "rslad")  # rslad: the teacher's soft labels replace both CE terms (`_rslad`)


def _rslad(b: Batch, weight: float) -> dict[str, torch.Tensor]:
    """RSLAD (Zi et al., ICCV 2021): the robust teacher's softmax on the clean input is the target of both inputs,
    weight · KL(T(x) ‖ S(x_adv)) + (1 − weight) · KL(T(x) ‖ S(x)) at temperature 1, no CE. The logged parts are the
    two weighted terms (ce_clean, ce_adv), so that they add up to the method's loss as with the other losses."""
    kl_adv = losses.logit_distillation(b.out_adv, b.teacher_logits)
    kl_clean = losses.logit_distillation(b.out_clean, b.teacher_logits)
    ce_clean, ce_adv = (1 - weight) * kl_clean, weight * kl_adv
    return {"loss": ce_clean + ce_adv, "ce_clean": ce_clean, "ce_adv": ce_adv}


@register_method(DEFAULT_METHOD, config_cls=PairConfig)
class PatchTraining(Method):
    """CE on the clean and the second input (or the stability objective on noise), for patches on a frozen base."""

    def objective(self, b: Batch) -> dict[str, torch.Tensor]:
        o, gamma = self.options, self.cfg.gamma
        ce_clean = losses.focal_ce(b.out_clean, b.y, gamma)
        if self.adversary() == Adversary.NOISE:  # stability: the noisy input must get the base's class of the clean one
            ce_adv = losses.focal_ce(b.out_adv, b.base_logits.argmax(1), gamma)
            return {"loss": ce_adv, "ce_clean": ce_clean, "ce_adv": ce_adv}
        if o.loss == "rslad":
            return _rslad(b, o.teacher_weight)
        ce_adv = ADV_LOSSES[o.loss](b.out_adv, b.out_clean, b.y, gamma, o.beta)
        return {"loss": ce_clean + ce_adv, "ce_clean": ce_clean, "ce_adv": ce_adv}
