"""Losses of the patch training (fixer paper eq. 3-4), returned as named parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_ce(logits: torch.Tensor, y: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Focal cross-entropy (Lin et al.); gamma = 0 is plain cross-entropy."""
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    if gamma == 0:
        return -logp.mean()
    return (-(1 - logp.exp()).pow(gamma) * logp).mean()


def feature_distillation(feats: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over sites of the element-mean squared error between patched features and base targets."""
    total = torch.zeros((), device=next(iter(targets.values())).device)
    for site, t in targets.items():
        total = total + F.mse_loss(feats[site], t)
    return total


def logit_distillation(logits: torch.Tensor, base_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(base || patched) on softened logits, scaled by T² as usual."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(base_logits / t, 1),
                    reduction="batchmean", log_target=True) * t * t
