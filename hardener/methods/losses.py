"""Losses of the patch training (fixer paper eq. 3-4), returned as named parts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_ce(logits: torch.Tensor, y: torch.Tensor, gamma: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Focal cross-entropy (Lin et al.); gamma = 0 is plain cross-entropy."""
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    per = -logp if gamma == 0 else -(1 - logp.exp()).pow(gamma) * logp
    return per.mean() if reduction == "mean" else per


def trades_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robustness term KL(p_clean ‖ p_adv), batch mean; gradients flow through both sides."""
    return F.kl_div(F.log_softmax(adv_logits, 1), F.log_softmax(clean_logits, 1), reduction="batchmean",
                    log_target=True)


def confusion(y: torch.Tensor, pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Row-normalised confusion matrix C[k, i] = P(pred = i | y = k); rows of absent classes are zero."""
    c = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    c.index_put_((y.long(), pred.long()), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    return c / c.sum(1, keepdim=True).clamp_min(1)


def vulnerability_from_confusion(c: torch.Tensor) -> torch.Tensor:
    """AdvAmd eq. 6 with attack difficulty α_k^i = 1 − C[k, i] (C: confusion of the adversarial predictions):
    Ā_k = 1 − (Σ_{i≠k} α_k^i + Σ_{j≠k} α_j^k) / (2(N−1)) = (out-flow of k + in-flow into k) / (2(N−1))."""
    n = c.shape[0]
    off = c - torch.diag(torch.diag(c))
    alpha = 1 - off
    alpha.fill_diagonal_(0)
    return (1 - (alpha.sum(1) + alpha.sum(0)) / (2 * (n - 1))).float()


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
