"""Auxiliary batch norm (Xie et al., thesis ch. 6-7; AdvAmd §4): a trainable twin of a base BatchNorm.

The twin starts as an exact copy of the base BN (affine parameters and running statistics) and
learns its own. Route `adv` normalises the BN's *input* with the twin; route `main` leaves the base
BN's output untouched, so route main is the base. Strength s interpolates: out + s·(twin(in) − out).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]


def select_bn_sites(net: nn.Module, spec: str) -> list[str]:
    """`--bn NAMES|REGEX|all|auto`: BatchNorm layers with running statistics, checked one by one. `auto` is
    `all` on a model that has such layers and none (no error) on one that has not."""
    names = bn_names(net)
    if spec.strip() == "auto":
        return names
    frozen = [n for n, m in net.named_modules() if "batchnorm" in type(m).__name__.lower() and n not in names]
    if not names:
        extra = f" ({len(frozen)} frozen/fused norm layers such as '{frozen[0]}' cannot get twins)" if frozen else ""
        raise InputError(f"the model has no BatchNorm layers with running statistics{extra}: auxiliary BNs need "
                         "them; use fixer or denoise patches instead")
    spec = spec.strip()
    if spec == "all":
        chosen = names
    elif all(p.strip() in dict(net.named_modules()) for p in spec.split(",")):
        chosen = [p.strip() for p in spec.split(",")]
    else:
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise InputError(f"--bn '{spec}' is neither a list of layer names nor a valid regex: {e}") from None
        chosen = [n for n in names if rx.fullmatch(n)]
        if not chosen:
            raise InputError(f"--bn '{spec}' matches no BatchNorm layer (they are named like: "
                             f"{', '.join(names[:5])}); pass names, a regex matching whole names, or 'all'")
    modules = dict(net.named_modules())
    for n in chosen:
        m = modules[n]
        if not isinstance(m, _BatchNorm):
            raise InputError(f"--bn '{n}' is a {type(m).__name__}, not a BatchNorm layer (BatchNorm layers: "
                             f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        if not m.track_running_stats or m.running_mean is None:
            raise InputError(f"--bn '{n}' keeps no running statistics (track_running_stats=False): "
                             "it cannot get an auxiliary twin")
    return chosen


class AuxBN(nn.Module):
    kind = "auxbn"
    input_only = False

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

    def forward(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return out
        new = self.twin(inp)
        return new if self.strength == 1 else out + self.strength * (new - out)
