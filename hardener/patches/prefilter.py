"""Pre-filter at the model input (site `input`, after normalisation): x -> x + strength·δ·g(x).

g = conv3x3(ReLU(conv3x3(ReLU(conv3x3(x))))) with `width` channels inside and the last conv
zero-initialised, so the patched model starts exactly equal to the base. With `stride` s > 1 the
first conv strides by s, the middle one runs at 1/s of the resolution (1/s² of its multiply-adds,
the bulk of the cost) and its output is upsampled (nearest) back before the last conv. Plain convolutions and
ReLUs: it cannot quantise its input, so it cannot hide gradients the way a rounding front-end does
(evaluate it with Square and the gradient-masking checks all the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..errors import InputError
from .base import CHANNELS, FINITE, PatchKind, Site, register_patch_kind


@dataclass
class PrefilterConfig:
    width: int = 32  # channels inside
    delta: float = 1.0  # strength δ
    stride: int = field(default=1, metadata={"option": "prefilter_stride"})  # of the first conv (see above)

    def __post_init__(self) -> None:
        self.width, self.delta, self.stride = int(self.width), float(self.delta), int(self.stride)
        if not 1 <= self.stride <= 8:
            raise InputError(f"--prefilter-stride must be an integer in 1..8, got {self.stride}")


@register_patch_kind("prefilter", placement="input", config_cls=PrefilterConfig)
class Prefilter(PatchKind):
    may_mask = True  # an input transform: evaluation attacks it with BPDA too (identity in the backward pass)

    def __init__(self, channels: int, width: int = 32, delta: float = 1.0, stride: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise InputError(f"--width must be at least 1, got {width}")
        self.delta, self.stride = delta, stride
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        spec = {"channels": self.conv1.in_channels, "width": self.conv1.out_channels, "delta": self.delta}
        if self.stride != 1:  # written only when used, so checkpoints of earlier versions read the same
            spec["stride"] = self.stride
        return spec

    @classmethod
    def build(cls, site: Site, config: PrefilterConfig) -> "Prefilter":
        return cls(site.shape[0], config.width, config.delta, config.stride)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Prefilter":
        return cls(spec["channels"], spec["width"], spec["delta"], spec.get("stride", 1))

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"channels": CHANNELS, "width": (V.int_in(1, 4096), "must be an integer in 1..4096"), "delta": FINITE,
                "stride": (V.int_in(1, 8), "must be an integer in 1..8", 1)}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c, w = spec["channels"], spec["width"]
        return c * w * 9 + w + w * w * 9 + w + w * c * 9 + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        if self.stride != 1:
            h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
        g = self.conv3(h)
        return x + (self.strength * self.delta) * g
