"""Low-rank weight delta (LoRA, Hu et al. 2021) on a frozen convolution or linear layer: a patch that adds capacity
at no inference cost.

Route adv computes the layer with the weight W + s·B·A instead of W (s: the patch's strength; the bias stays the
base's): A (R × fan-in, where fan-in is the weight's size per output channel: in-channels/groups × kernel) starts as
nn.Linear's default initialisation, B (out-channels × R) at zero, so the freshly patched model equals the base exactly.
Route main, and strength 0, run the base layer itself. The base's weight is never written: the patch holds A and B
only (R·(out + fan-in) values).

Served, the delta costs nothing per image: the merged weight W + s·B·A is computed once and kept (the memory of one
more copy of the weight), and every forward runs the base layer's own operation on it (the same multiply-adds as the
base). It is recomputed when A, B, W or the strength change (their tensor versions are its key). While A or B can
receive gradients (training, or any forward with grad enabled on them) the merge is part of each forward instead, so
that gradients reach them; an exported model (torch.jit.trace under no_grad, `harden export`) carries the merged
weight as a constant.

It is placed with `--at lora:SITE` (a Conv1d/2d/3d or Linear layer) or `--at lora:auto` (every such layer the
eval-mode forward runs), `--lora-rank R`. Like a BN twin, it replaces its layer's computation on route adv (placement
"layer"); unlike a twin, it copies nothing of the layer.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options import validate as V
from ..options.kind_options import LoraConfig
from .base import PatchKind, Site, register_patch_kind

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # what a lora patch serves
LAYER_WORDS = "Conv1d, Conv2d, Conv3d or Linear"
MAX_VALUES = 1 << 28


def _weight_shape(v: Any) -> bool:
    return (isinstance(v, list) and 2 <= len(v) <= 5 and all(V.int_in(1, 1 << 24)(x) for x in v)
            and math.prod(v) <= MAX_VALUES)


def layer_ok(module: nn.Module) -> str:
    """Why `module` cannot take a lora patch ("" when it can)."""
    if not isinstance(module, LAYER_TYPES):
        return f"is a {type(module).__name__}, not a {LAYER_WORDS} layer"
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.is_meta or isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "has no materialised weight"
    if not w.is_floating_point():
        return f"has a {w.dtype} weight (quantised?): a lora delta needs a floating-point weight"
    return ""


@register_patch_kind("lora", placement="layer", config_cls=LoraConfig)
class Lora(PatchKind):
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = LAYER_TYPES

    def __init__(self, weight_shape: list[int], config: LoraConfig) -> None:
        super().__init__()
        self.config = config
        self.weight_shape = [int(v) for v in weight_shape]
        out, fan = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.down = nn.Parameter(torch.empty(config.rank, fan))  # A
        self.up = nn.Parameter(torch.zeros(out, config.rank))  # B: zero, so the delta starts at zero
        if not self.down.is_meta:
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.strength = 1.0
        self._merged: torch.Tensor | None = None
        self._key: tuple | None = None

    @classmethod
    def build(cls, site: Site, config: LoraConfig) -> PatchKind:
        why = layer_ok(site.module)
        if why:
            raise InputError(f"'{site.name}' {why}: lora patches go on {LAYER_WORDS} layers")
        return cls(list(site.module.weight.shape), config)

    def extra_spec(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape), "rank": self.config.rank}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Lora":
        return cls(spec["weight_shape"], LoraConfig(rank=spec["rank"]))

    @classmethod
    def restore(cls, spec: dict[str, Any], module: nn.Module | None) -> "Lora":
        """The patch at the base's layer `module`, which must be a layer of the recorded weight shape."""
        site = spec.get("site", "?")
        why = layer_ok(module) if module is not None else "is the model input"
        if why:
            raise InputError(f"manifest puts a lora patch at '{site}', which {why}")
        if list(module.weight.shape) != list(spec["weight_shape"]):
            raise InputError(f"manifest's lora patch at '{site}' is for a weight of shape {spec['weight_shape']}, but "
                             f"the model's layer there has {list(module.weight.shape)}: is this the architecture the "
                             "model was patched with?")
        return cls.from_spec(spec)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"weight_shape": (_weight_shape, "must be a list of 2 to 5 positive sizes"),
                "rank": (V.int_in(1, 4096), "must be an integer in 1..4096")}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        shape = spec["weight_shape"]
        return spec["rank"] * (shape[0] + math.prod(shape[1:]))

    @property
    def uses_base(self) -> bool:
        """Route adv needs the base layer's own output only at strength 0 (the base, exactly)."""
        return self.strength == 0

    def delta(self) -> torch.Tensor:
        """B·A in the layer's weight shape."""
        return (self.up @ self.down).view(self.weight_shape)

    def weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight route adv runs the layer with: W + s·B·A, merged once and kept while nothing it depends on
        changes, computed in the forward while A or B may receive gradients."""
        # tensors through `_parameters`, not attribute access: nn.Module's `__getattr__` costs about 1 µs a name, and
        # this runs per layer per forward (a weight outside it, a parametrisation's, is read as an attribute)
        params = self._parameters
        up, down = params["up"], params["down"]
        w = layer._parameters.get("weight")
        if w is None:
            w = layer.weight
        if torch.is_grad_enabled() and (up.requires_grad or down.requires_grad):
            return w + (self.strength * self.delta()).to(w.dtype)
        key = (w.data_ptr(), w._version, w.dtype, up.data_ptr(), up._version, down.data_ptr(), down._version,
               self.strength)
        if self._key != key or self._merged is None:
            with torch.no_grad():
                self._merged = w + (self.strength * self.delta()).to(w.dtype)
            self._key = key
        return self._merged

    def forward(self, out: torch.Tensor | None, inp: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Route adv's output of `layer` on its input `inp` (`out`, the layer's own output, only at strength 0)."""
        if self.strength == 0:
            return out
        w = self.weight(layer)
        bias = layer._parameters["bias"] if "bias" in layer._parameters else layer.bias
        if isinstance(layer, nn.Linear):
            return F.linear(inp, w, bias)
        return layer._conv_forward(inp, w, bias)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_merged"], state["_key"] = None, None  # a copy merges its own
        return state
