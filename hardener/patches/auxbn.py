"""Auxiliary batch norm (Xie et al., thesis ch. 6-7; AdvAmd §4): a trainable twin of a base BatchNorm.

The twin starts as an exact copy of the base BN module (a deep copy: its class, affine parameters, running
statistics, and whatever the layer fuses after the normalisation, such as timm's `BatchNormAct2d` activation and
drop) and learns its own. Route `adv` normalises the BN's *input* with the twin; route `main` leaves the base BN's
output untouched, so route main is the base. Strength s interpolates: out + s·(twin(in) − out).

A checkpoint records the twin's class name but is never trusted to name code: on loading, the twin is again a deep
copy of the base's own layer at that site (which must be of the recorded class), then its trained tensors load.

LayerNorm twins (`auxln`, what --bn gives a transformer's LayerNorms) work the same way: a deep copy of the base's
LayerNorm with its own affine parameters, route adv through the twin, route main the base. `--method auxbn` and
`auxln` both twin each --bn layer with the kind that fits it (BatchNorm: auxbn; LayerNorm: auxln).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from ..options import validate as V
from .attach import copy_without_hooks
from .base import BOOL, CHANNELS, PatchKind, Site, register_patch_kind

CLASS_NAME = (lambda v: isinstance(v, str) and 0 < len(v) <= 100 and v.isidentifier(), "must be a class name")


def twin_of(bn: _BatchNorm) -> nn.Module:
    """A trainable deep copy of `bn` (class, fused activation and drop, statistics, affine parameters), without the
    hooks the base's layer carries (harden's own among them)."""
    twin = copy_without_hooks(bn)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


@register_patch_kind("auxbn", placement="bn")
class AuxBN(PatchKind):
    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.twin = twin_of(bn)
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        t = self.twin
        return {"type": type(t).__name__, "features": t.num_features, "eps": t.eps, "momentum": t.momentum,
                "affine": t.affine}

    norm_types: ClassVar[tuple[type, ...]] = (_BatchNorm,)  # the layers this kind twins

    @classmethod
    def build(cls, site: Site, config: Any = None) -> PatchKind:
        return cls.from_module(site.module)

    @classmethod
    def from_module(cls, module: nn.Module) -> PatchKind:
        """The twin of `module`: an auxbn patch for a BatchNorm, an auxln patch for a LayerNorm."""
        if isinstance(module, nn.LayerNorm):
            return AuxLN(module)
        if not isinstance(module, _BatchNorm):
            raise InputError(f"auxiliary twins attach to BatchNorm and LayerNorm layers, not {type(module).__name__}")
        return AuxBN(module)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "AuxBN":
        """A twin of a plain torch BatchNorm (other classes are rebuilt from the base's layer: `restore`)."""
        kinds = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}
        if spec["type"] not in kinds:
            raise InputError(f"an auxiliary BN of type '{spec['type']}' is rebuilt from the base's own layer at "
                             f"'{spec.get('site', '?')}', not from the manifest alone")
        return cls(kinds[spec["type"]](spec["features"], eps=spec["eps"], momentum=spec["momentum"],
                                       affine=spec["affine"]))

    @classmethod
    def restore(cls, spec: dict[str, Any], module: nn.Module | None) -> "AuxBN":
        """The twin of the base's layer at the spec's site: a deep copy of that layer, which must be the BatchNorm
        the manifest describes (class name, features, eps, affine); the trained tensors load afterwards."""
        site = spec.get("site", "?")
        if not isinstance(module, _BatchNorm):
            raise InputError(f"manifest puts an auxiliary BN at '{site}', which is a {type(module).__name__}, "
                             "not a BatchNorm")
        got = {"type": type(module).__name__, "features": module.num_features, "affine": module.affine}
        want = {k: spec[k] for k in got}
        if got != want or abs(module.eps - spec["eps"]) > 1e-12:
            raise InputError(f"manifest's auxiliary BN at '{site}' is a {want['type']} with {want['features']} "
                             f"features (affine {want['affine']}, eps {spec['eps']}), but the model's layer there is "
                             f"a {got['type']} with {got['features']} (affine {got['affine']}, eps {module.eps}): "
                             "is this the architecture the model was patched with?")
        patch = cls(module)
        patch.twin.momentum = spec["momentum"]
        return patch

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"type": CLASS_NAME, "features": CHANNELS,
                "eps": (V.number(0, 1, open_lo=True), "must be a small positive number"),
                "momentum": (V.optional(V.number(0, 1)), "must be null or a number in [0, 1]"), "affine": BOOL}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        return 4 * spec["features"] + 1  # weight, bias, running mean and var, batches tracked

    @property
    def uses_base(self) -> bool:
        """Whether route adv needs the base layer's output (`out` of `forward`): only to blend, strength below 1."""
        return self.strength != 1

    def forward(self, out: torch.Tensor | None, inp: torch.Tensor) -> torch.Tensor:
        """Route adv's output from the base layer's input `inp` and, when `uses_base`, its output `out` (None at
        strength 1: the base layer does not run)."""
        if self.strength == 0:
            return out
        new = self._modules["twin"](inp)  # not `self.twin`: nn.Module's `__getattr__` costs about 1 µs per forward
        return new if self.strength == 1 else out + self.strength * (new - out)


def _norm_shape(v: Any) -> bool:
    return (isinstance(v, list) and 1 <= len(v) <= 4 and all(V.int_in(1, V.MAX_CHANNELS)(x) for x in v)
            and math.prod(v) <= 1 << 28)


@register_patch_kind("auxln", placement="bn")
class AuxLN(AuxBN):
    """A trainable twin of a base LayerNorm (its class, normalised shape, eps, affine parameters): route adv
    normalises the layer's input with it, route main leaves the base's output."""

    norm_types = (nn.LayerNorm,)

    def extra_spec(self) -> dict[str, Any]:
        t = self.twin
        return {"type": type(t).__name__, "shape": list(t.normalized_shape), "eps": t.eps,
                "affine": t.elementwise_affine, "bias": t.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "AuxLN":
        """A twin of a plain torch LayerNorm (other classes are rebuilt from the base's layer: `restore`)."""
        if spec["type"] != "LayerNorm":
            raise InputError(f"an auxiliary LayerNorm of type '{spec['type']}' is rebuilt from the base's own layer "
                             f"at '{spec.get('site', '?')}', not from the manifest alone")
        return cls(nn.LayerNorm(spec["shape"], eps=spec["eps"], elementwise_affine=spec["affine"],
                                bias=spec["bias"]))

    @classmethod
    def restore(cls, spec: dict[str, Any], module: nn.Module | None) -> "AuxLN":
        """The twin of the base's layer at the spec's site: a deep copy of that layer, which must be the LayerNorm the
        manifest describes (class name, shape, eps, affine, bias); the trained tensors load afterwards."""
        site = spec.get("site", "?")
        if not isinstance(module, nn.LayerNorm):
            raise InputError(f"manifest puts an auxiliary LayerNorm at '{site}', which is a "
                             f"{type(module).__name__}, not a LayerNorm")
        got = {"type": type(module).__name__, "shape": list(module.normalized_shape),
               "affine": module.elementwise_affine, "bias": module.bias is not None}
        want = {k: spec[k] for k in got}
        if got != want or abs(module.eps - spec["eps"]) > 1e-12:
            raise InputError(f"manifest's auxiliary LayerNorm at '{site}' is a {want['type']} over {want['shape']} "
                             f"(affine {want['affine']}, eps {spec['eps']}), but the model's layer there is a "
                             f"{got['type']} over {got['shape']} (affine {got['affine']}, eps {module.eps}): is this "
                             "the architecture the model was patched with?")
        return cls(module)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"type": CLASS_NAME, "shape": (_norm_shape, "must be a list of 1 to 4 positive sizes"),
                "eps": (V.number(0, 1, open_lo=True), "must be a small positive number"), "affine": BOOL,
                "bias": (*BOOL, True)}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        return math.prod(spec["shape"]) * (1 + spec["bias"]) if spec["affine"] else 0
