"""Auxiliary batch norm (Xie et al., thesis ch. 6-7; AdvAmd §4): a trainable twin of a base BatchNorm.

The twin starts as an exact copy of the base BN (affine parameters and running statistics) and
learns its own. Route `adv` normalises the BN's *input* with the twin; route `main` leaves the base
BN's output untouched, so route main is the base. Strength s interpolates: out + s·(twin(in) − out).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import validate as V
from ..errors import InputError
from .base import BOOL, CHANNELS, PatchKind, Site, choice, register_patch_kind


@register_patch_kind("auxbn", placement="bn")
class AuxBN(PatchKind):
    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.twin = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                             track_running_stats=True)
        self.twin.load_state_dict(bn.state_dict())
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        t = self.twin
        return {"type": type(t).__name__, "features": t.num_features, "eps": t.eps, "momentum": t.momentum,
                "affine": t.affine}

    @classmethod
    def build(cls, site: Site, config: Any = None) -> "AuxBN":
        return cls.from_module(site.module)

    @classmethod
    def from_module(cls, module: nn.Module) -> "AuxBN":
        if not isinstance(module, _BatchNorm):
            raise InputError(f"auxbn patches attach to BatchNorm layers, not {type(module).__name__}")
        return cls(module)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "AuxBN":
        kinds = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}
        if spec["type"] not in kinds:
            raise InputError(f"unknown auxiliary BN type '{spec['type']}'")
        return cls(kinds[spec["type"]](spec["features"], eps=spec["eps"], momentum=spec["momentum"],
                                       affine=spec["affine"]))

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"type": choice(V.BN_TYPES), "features": CHANNELS,
                "eps": (V.number(0, 1, open_lo=True), "must be a small positive number"),
                "momentum": (V.optional(V.number(0, 1)), "must be null or a number in [0, 1]"), "affine": BOOL}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        return 4 * spec["features"] + 1  # weight, bias, running mean and var, batches tracked

    def forward(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return out
        new = self.twin(inp)
        return new if self.strength == 1 else out + self.strength * (new - out)
