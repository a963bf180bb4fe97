"""Fixer module (fixer paper §3.1, Table 7): h -> h + strength·δ·φ(h), optional final ReLU.

φ = ζ(conv3x3(ReLU(conv1x1(h)))) − ζ(0), with the 3×3 conv zero-initialised, so φ ≡ 0 at the
start for every ζ and the patched model starts exactly equal to the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..errors import InputError
from .base import BOOL, CHANNELS, FINITE, PatchKind, choice, register_patch_kind

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda z: z,
    "tanh": torch.tanh,
    "silu": F.silu,
    "softplus": F.softplus,
    "gelu": F.gelu,
}


@dataclass
class FixerConfig:
    rho: float = 4.0
    delta: float = 1.0
    act: str = "linear"
    final_relu: bool = False

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise InputError(f"unknown fixer activation '{self.act}' (choose from {', '.join(ACTIVATIONS)})")
        if self.rho <= 0:
            raise InputError(f"--rho must be positive, got {self.rho}")
        self.final_relu = bool(self.final_relu)


@register_patch_kind("fixer", placement="output", config_cls=FixerConfig)
class Fixer(PatchKind):
    def __init__(self, channels: int, config: FixerConfig) -> None:
        super().__init__()
        self.config = config
        hidden = max(1, int(channels // config.rho))
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.strength = 1.0
        act = ACTIVATIONS[config.act]
        self._act = act
        self._act0 = float(act(torch.zeros(())))

    def extra_spec(self) -> dict[str, Any]:
        return {"channels": self.conv2.out_channels, "rho": self.config.rho, "delta": self.config.delta,
                "act": self.config.act, "final_relu": self.config.final_relu}

    @classmethod
    def check_site(cls, info: Any, config: FixerConfig) -> None:
        if config.final_relu and not info.nonnegative:
            raise InputError(f"--final-relu needs non-negative features, but '{info.name}' outputs negative values "
                             "(on a dry run); drop --final-relu or choose a site after a ReLU")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Fixer":
        cfg = FixerConfig(rho=spec["rho"], delta=spec["delta"], act=spec["act"], final_relu=spec["final_relu"])
        return cls(spec["channels"], cfg)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"channels": CHANNELS, "rho": (V.number(0, 1e6, open_lo=True), "must be a positive number"),
                "delta": FINITE, "act": choice(ACTIVATIONS), "final_relu": BOOL}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c = spec["channels"]
        hidden_f = c / spec["rho"]
        if hidden_f > 1 << 24:
            raise InputError(f"manifest patch at '{spec['site']}': rho {spec['rho']} asks for {hidden_f:.3g} "
                             "hidden channels")
        h = max(1, int(c // spec["rho"]))
        return c * h + h + h * c * 9 + c

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.conv2(F.relu(self.conv1(h)))
        phi = self._act(z) - self._act0
        out = h + (self.strength * self.config.delta) * phi
        return F.relu(out) if self.config.final_relu else out
