"""AdvAmd (Algorithm 1, with labels where its listing writes the model output): the whole model trains on
adversarial examples made once, on the original model (stage 1); mediate samples x + φ·δ and clean ones go
through the main BNs, adversarial ones through the twins; loss β1·CE_clean + β2·CE_mediate + β3·Ā_y·CE_adv, Ā
the per-class vulnerability of the stage-1 outcomes (eq. 6); training stops once an epoch's mean loss is
below σ."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..evaluation.threats import predict
from ..options.choices import Adversary
from ..options.kind_options import AdvAmdConfig
from . import losses
from .base import Batch, Method, register_method


def vulnerability(ds, adv: torch.Tensor, source: torch.nn.Module, n_classes: int, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """AdvAmd's per-class vulnerability coefficient Ā (eq. 6) from the stage-1 attack outcomes.

    α_k^i, the difficulty of turning class k into class i, is 1 − C[k, i], where C[k, i] is the
    fraction of the class-k samples whose adversarial example the original model assigns to i.
    """
    pred = predict(source, adv, batch_size, device).argmax(1)
    return losses.vulnerability_from_confusion(losses.confusion(ds.labels, pred, n_classes))


@register_method("advamd", config_cls=AdvAmdConfig)
class AdvAmd(Method):
    trains_base = True
    dual_bn = True
    auxbn = "required"
    default_lr = 1e-3

    def adversary(self) -> str:
        if self.cfg.noise_sigma:
            raise InputError("--method advamd makes its adversarial examples once, on the original model: "
                             "--noise-sigma does not apply")
        return Adversary.ONCE

    def prepare(self, run) -> None:
        self.abar = vulnerability(run.ds, run.cached_adv, run.teacher, run.spec.n_classes, run.cfg.batch_size,
                                  run.device).to(run.device)

    def objective(self, b: Batch) -> dict[str, torch.Tensor]:
        o, gamma = self.options, self.cfg.gamma
        ce_clean = losses.focal_ce(b.out_clean, b.y, gamma)
        with b.model.route("main"):  # mediate samples on the main BNs
            out_med = b.model(b.x + o.phi * (b.x_adv - b.x))
        ce_adv = (self.abar[b.y] * losses.focal_ce(b.out_adv, b.y, gamma, reduction="none")).mean()
        b1, b2, b3 = o.betas
        loss = b1 * ce_clean + b2 * losses.focal_ce(out_med, b.y, gamma) + b3 * ce_adv
        return {"loss": loss, "ce_clean": ce_clean, "ce_adv": ce_adv}

    def converged(self, epoch_loss: float) -> bool:
        return epoch_loss < self.options.sigma
