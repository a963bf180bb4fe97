"""APGD (Croce & Hein, ICML 2020) with CE or DLR loss, Linf or L2, restarts and EOT, as torchattacks 3.5 runs it.

The same algorithm and arithmetic as `torchattacks.APGD` (its random start drawn on the CPU, its checkpoint rule
with the first window compared against a zero loss, its momentum 0.75), so with `stop_early=False` the result is
the same tensor for image batches (N, C, H, W; tests/test_apgd.py checks that; other shapes work per sample where
torchattacks would fail). The model must be in eval mode (`attacks.Attack` sees to it). One thing is added: with
`stop_early=True` a sample leaves the batch at the step that misclassifies it. Its verdict cannot change after that
(APGD counts a sample as broken once any iterate is misclassified), and every per-sample quantity (step size,
momentum, best loss, checkpoint flags) is the sample's own, so for a deterministic model that answers each sample
alone the others go on as before, in fewer forward and backward passes. What differs is the example returned for a
broken sample: the first misclassified iterate, not the last, so just across the boundary. Evaluation asks for it
only where that is safe (`evaluation.threats._scores_as_it_attacks`) and attacks again, without the stop, any sample whose
example the score calls correct; training keeps the reference behaviour.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The difference-of-logits ratio (higher = more adversarial), in torchattacks' arithmetic order."""
    z, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).float()
    true = logits[torch.arange(len(y), device=y.device), y]
    return -(true - z[:, -2] * top_is_y - z[:, -1] * (1.0 - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def _losses(name: str):
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss
    raise ValueError(f"APGD loss must be ce or dlr, got {name!r}")


class _Run:
    """One restart on the samples still correct: per-sample state, compacted when some of it leaves."""

    def __init__(self, model: nn.Module, ndim: int, eps: float, norm: str, steps: int, loss: str, eot: int,
                 rho: float) -> None:
        self.model, self.eps, self.norm, self.steps, self.eot, self.rho = model, eps, norm, steps, eot, rho
        self.criterion = _losses(loss)
        self.dims = tuple(range(1, ndim))  # the sample's own dimensions, and a per-sample scalar's shape
        self.col = (-1,) + (1,) * (ndim - 1)

    def _gradient(self, x_adv: torch.Tensor, y: torch.Tensor):
        grad = torch.zeros_like(x_adv)
        for _ in range(self.eot):
            point = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(point)
                loss = self.criterion(logits, y)
            grad += torch.autograd.grad(loss.sum(), [point])[0].detach()
        grad /= float(self.eot)
        return logits.detach(), loss.detach(), grad

    def _l2_ball(self, x: torch.Tensor, z: torch.Tensor, pad: float) -> torch.Tensor:
        d = z - x
        n = (d ** 2).sum(dim=self.dims, keepdim=True).sqrt()
        return torch.clamp(x + d / (n + 1e-12) * torch.clamp(n + pad, max=self.eps), 0.0, 1.0)

    def _step(self, x: torch.Tensor, x_adv: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor,
              step_size: torch.Tensor, a: float) -> torch.Tensor:
        eps = self.eps
        if self.norm == "Linf":
            z = x_adv + step_size * torch.sign(grad)
            z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
            z = x_adv + (z - x_adv) * a + momentum * (1 - a)
            return torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
        z = x_adv + step_size * grad / ((grad ** 2).sum(dim=self.dims, keepdim=True).sqrt() + 1e-12)
        z = self._l2_ball(x, z, 0.0)
        return self._l2_ball(x, x_adv + (z - x_adv) * a + momentum * (1 - a), 1e-12)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """A random point of the eps-ball's surface (Linf: a corner direction; L2: a Gaussian direction), in [0, 1]."""
        ones = torch.ones((len(x),) + self.col[1:], device=x.device)
        if self.norm == "Linf":
            t = (2 * torch.rand(x.shape) - 1).to(x.device)
            x_adv = x + self.eps * ones * t / t.reshape(len(x), -1).abs().max(dim=1, keepdim=True)[0].reshape(self.col)
        else:
            t = torch.randn(x.shape).to(x.device)
            x_adv = x + self.eps * ones * t / ((t ** 2).sum(dim=self.dims, keepdim=True).sqrt() + 1e-12)
        return x_adv.clamp(0.0, 1.0)

    @staticmethod
    def _checkpoint(s: dict, i: int, window: int, rho: float) -> None:
        """Halve the step where fewer than rho of the window's steps raised the loss, or where the last checkpoint
        kept the step and the best loss has not risen since; those restart from their best point."""
        h = s["history"]
        rises = sum((h[:, i - c] > h[:, i - c - 1]).double() for c in range(window))
        reduce = (rises <= window * rho) | (~s["reduced_at_check"] & (s["loss_at_check"] >= s["loss_best"]))
        s["reduced_at_check"], s["loss_at_check"] = reduce.clone(), s["loss_best"].clone()
        if reduce.any():
            s["step_size"][reduce] /= 2.0
            s["x_adv"][reduce] = s["x_best"][reduce].clone()
            s["grad"][reduce] = s["grad_best"][reduce].clone()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, stop_early: bool):
        """(broken, adversarial): which samples some iterate misclassified, and such an iterate for each (the
        random start where none did)."""
        n, steps = len(x), self.steps
        window, window_min, window_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), \
            max(int(0.03 * steps), 1)
        x_adv = self._start(x)
        out_broken, out_adv = torch.zeros(n, dtype=torch.bool, device=x.device), x_adv.clone()
        logits, loss, grad = self._gradient(x_adv, y)
        # Everything per sample, first dimension = the samples still attacked ("history": each step's loss).
        s = {"idx": torch.arange(n, device=x.device), "x": x, "y": y, "x_adv": x_adv, "x_old": x_adv.clone(),
             "x_best": x_adv.clone(), "x_best_adv": x_adv.clone(), "grad": grad, "grad_best": grad.clone(),
             "correct": logits.argmax(1) == y, "loss_best": loss.clone(), "loss_at_check": loss.clone(),
             "reduced_at_check": torch.ones(n, dtype=torch.bool, device=x.device),
             "step_size": self.eps * torch.ones((n,) + self.col[1:], device=x.device) * 2.0,
             "history": torch.zeros(n, steps, device=x.device)}

        def settle(drop: bool) -> None:  # record the broken samples; with `drop`, stop attacking them
            done = ~s["correct"]
            out_broken[s["idx"][done]] = True
            out_adv[s["idx"][done]] = s["x_best_adv"][done]
            if drop:
                keep = s["correct"]
                for k in s:
                    s[k] = s[k][keep]

        since_check = 0
        for i in range(steps):
            if stop_early and not s["correct"].all():
                settle(drop=True)
                if len(s["idx"]) == 0:
                    break
            with torch.no_grad():
                momentum = s["x_adv"] - s["x_old"]
                s["x_old"] = s["x_adv"].clone()
                s["x_adv"] = self._step(s["x"], s["x_adv"], s["grad"], momentum, s["step_size"],
                                        0.75 if i > 0 else 1.0)
            logits, loss, s["grad"] = self._gradient(s["x_adv"], s["y"])
            pred = logits.argmax(1) == s["y"]
            s["correct"] = s["correct"] & pred
            s["x_best_adv"][~pred] = s["x_adv"][~pred]
            s["history"][:, i] = loss
            better = loss > s["loss_best"]
            for best, now in (("x_best", "x_adv"), ("grad_best", "grad")):
                s[best][better] = s[now][better]
            s["loss_best"][better] = loss[better]
            since_check += 1
            if since_check == window:
                self._checkpoint(s, i, window, self.rho)
                since_check = 0
                window = max(window - window_decr, window_min)
        settle(drop=False)
        return out_broken, out_adv


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf", steps: int = 100,
         loss: str = "ce", restarts: int = 1, eot: int = 1, seed: int = 0, rho: float = 0.75,
         stop_early: bool = False) -> torch.Tensor:
    """Adversarial examples for (x, y), x in [0, 1]: each broken sample's misclassified iterate, the input itself
    for the rest (as torchattacks returns them). Restarts attack only what earlier ones left correct."""
    if norm not in ("Linf", "L2"):
        raise ValueError(f"APGD norm must be Linf or L2, got {norm!r}")
    x, y = x.detach(), y.detach()
    adv = x.clone()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    torch.random.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.random.manual_seed(seed)
    run = _Run(model, x.dim(), eps, norm, steps, loss, eot, rho)
    for _ in range(restarts):
        todo = correct.nonzero().flatten()
        if todo.numel() == 0:
            continue
        broken, found = run(x[todo], y[todo], stop_early)  # indexing copies
        correct[todo[broken]] = False
        adv[todo[broken]] = found[broken]
    return adv
