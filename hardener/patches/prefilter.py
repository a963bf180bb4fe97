"""Pre-filter at the model input (site `input`, after normalisation): x -> x + strength·δ·g(x).

g = conv3x3(ReLU(conv3x3(ReLU(conv3x3(x))))) with `width` channels inside and the last conv
zero-initialised, so the patched model starts exactly equal to the base. Plain convolutions and
ReLUs: it cannot quantise its input, so it cannot hide gradients the way a rounding front-end does
(evaluate it with Square and the gradient-masking checks all the same).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


class Prefilter(nn.Module):
    kind = "prefilter"
    input_only = True
    may_mask = True  # an input transform: evaluation attacks it with BPDA too (identity in the backward pass)

    def __init__(self, channels: int, width: int = 32, delta: float = 1.0) -> None:
        super().__init__()
        if width < 1:
            raise InputError(f"--width must be at least 1, got {width}")
        self.delta = delta
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        return {"channels": self.conv1.in_channels, "width": self.conv1.out_channels, "delta": self.delta}

    @classmethod
    def from_options(cls, channels: int, spatial: tuple[int, int], opts: dict[str, Any]) -> "Prefilter":
        return cls(channels, int(opts.get("width", 32)), float(opts.get("delta", 1.0)))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Prefilter":
        return cls(spec["channels"], spec["width"], spec["delta"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return x + (self.strength * self.delta) * g
