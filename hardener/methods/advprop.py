"""AdvProp (Xie et al.; thesis, Algorithm 2): the whole model trains, the clean batch through the main BNs, its
adversarial counterpart (made against the model, through the auxiliary BNs) through the twins; loss
CE_clean + CE_adv (the patch method's objective)."""
from __future__ import annotations

from .adv_train import AdvTrain
from .base import register_method
from .patch import PairConfig


@register_method("advprop", config_cls=PairConfig)
class AdvProp(AdvTrain):
    dual_bn = True
    auxbn = "required"
