"""Time estimates of a training run, in forward passes of one image, measured as the run goes."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..attacks import AttackSpec
    from ..training.fit import FitConfig


# Cost units of the time estimate: one forward pass of one image. A backward pass costs about two.
VAL_UNITS = 3 * 10 + 3  # validation per image: PGD-10 on the patched model, three forward passes (clean, wb, tr)


def train_units(cfg: "FitConfig", spec: "AttackSpec") -> float:
    """Forward-pass equivalents per image of one optimiser step: the attack when it runs every step, the clean
    and adversarial passes with their backward, the base's targets, and a robust teacher's soft labels (one
    forward, counted as one whatever the teacher's size)."""
    attack = 3 * int(spec.steps or 1) if not (cfg.cached_adversarials or cfg.noise_sigma) else 0
    return attack + 2 * 3 + 1 + (1 if cfg.teacher is not None else 0)


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Clock:
    """Time estimates of a training run: seconds per step measured from the first steps (the very first one,
    which pays for allocation, is not counted), validation measured once it has run (estimated from the same
    unit cost before). `on_estimate` gets the first estimate once `TIMED` steps are measured."""

    TIMED = 3

    def __init__(self, steps_left: int, vals_left: int, step_units: float, val_units: float,
                 on_estimate: Callable[[dict], None] | None = None) -> None:
        self.steps_left, self.vals_left = steps_left, vals_left
        self.step_units, self.val_units = step_units, val_units
        self.on_estimate = on_estimate
        self.skip = 1 if steps_left > self.TIMED + 1 else 0
        self.steps, self.step_seconds, self.val_seconds, self.vals = 0, 0.0, 0.0, 0
        self._last = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        if self.steps >= self.skip:
            self.step_seconds += now - self._last
        self.steps += 1
        self.steps_left -= 1
        self._last = now
        if self.on_estimate is not None and (self._timed() >= self.TIMED or self.steps_left == 0) and self._timed():
            self.on_estimate(self.estimate())
            self.on_estimate = None

    def _timed(self) -> int:
        return max(0, self.steps - self.skip)

    def validated(self, seconds: float) -> None:
        self.val_seconds += seconds
        self.vals += 1
        self.vals_left -= 1
        self._last = time.perf_counter()

    @property
    def per_step(self) -> float:
        return self.step_seconds / max(1, self._timed())

    @property
    def unit_seconds(self) -> float:
        """Seconds of one forward pass of one image, as measured by the training steps."""
        return self.per_step / max(1e-9, self.step_units)

    def estimate(self) -> dict:
        per_val = self.val_seconds / self.vals if self.vals else self.unit_seconds * self.val_units
        train, val = self.steps_left * self.per_step, self.vals_left * per_val
        return {"train_seconds": train, "validation_seconds": val, "seconds": train + val,
                "seconds_per_step": self.per_step, "unit_seconds": self.unit_seconds, "timed_steps": self._timed()}

    def eta_text(self) -> str:
        return fmt_seconds(self.estimate()["seconds"]) if self._timed() else "?"
