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

It is placed with `--at lora:SITE` (a Conv1d/2d/3d, Linear or MultiheadAttention layer) or `--at lora:auto` (every
such layer the eval-mode forward runs), `--lora-rank R`. Like a BN twin, it replaces its layer's computation on route
adv (placement "layer"); unlike a twin, it keeps none of the layer's tensors.

On an `nn.MultiheadAttention` (whose forward reads its projections' weights itself: its `out_proj` never runs as a
layer) the patch holds two deltas, one on the packed query/key/value projection `in_proj_weight` (3E × E) and one on
`out_proj.weight` (E × E), and runs the layer's own forward (its fast path included) on a stand-in that shares every
tensor of the layer but those two weights (`_stand_in`).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InputError
from ..options import validate as V
from ..options.kind_options import LoraConfig
from .attach import RUN_HOOKS, STATE_HOOKS, copy_without_hooks
from .base import PatchKind, Site, register_patch_kind

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                            nn.MultiheadAttention)  # what a lora patch serves
LAYER_WORDS = "Conv1d, Conv2d, Conv3d, Linear or MultiheadAttention"
MAX_VALUES = 1 << 28


def _weight_shape(v: Any) -> bool:
    return (isinstance(v, list) and 2 <= len(v) <= 5 and all(V.int_in(1, 1 << 24)(x) for x in v)
            and math.prod(v) <= MAX_VALUES)


def _weights(module: nn.Module) -> list:
    """The weights a lora patch on `module` adds deltas to: its `weight`; an attention layer's two projections."""
    if isinstance(module, nn.MultiheadAttention):
        return [module.in_proj_weight, getattr(getattr(module, "out_proj", None), "weight", None)]
    return [getattr(module, "weight", None)]


def layer_ok(module: nn.Module) -> str:
    """Why `module` cannot take a lora patch ("" when it can)."""
    if not isinstance(module, LAYER_TYPES):
        return f"is a {type(module).__name__}, not a {LAYER_WORDS} layer"
    if isinstance(module, nn.MultiheadAttention):
        if type(module).forward is not nn.MultiheadAttention.forward:
            return (f"is a {type(module).__name__}, an attention layer with a forward of its own (it may not read "
                    "in_proj_weight): a lora patch serves torch's nn.MultiheadAttention itself")
        if module.in_proj_weight is None:
            return ("is an attention layer with separate query, key and value projections (kdim or vdim differs "
                    "from embed_dim): a lora patch takes the packed projection only")
        if parametrize.is_parametrized(module) or parametrize.is_parametrized(module.out_proj):
            return "is an attention layer with parametrised weights: a lora patch takes plain ones"
    for w in _weights(module):
        if not isinstance(w, torch.Tensor) or w.is_meta or isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return "has no materialised weight"
        if not w.is_floating_point():
            return f"has a {w.dtype} weight (quantised?): a lora delta needs a floating-point weight"
    return ""


def _stand_in(layer: nn.Module) -> nn.Module:
    """A copy of `layer` (its class, settings and mode) whose tensors are the layer's own objects, shared (so it follows
    the layer's device and dtype moves): the patch puts its two weights into it (`in_proj_weight`, `out_proj.weight`)
    before each call, and the layer's own forward runs on them. It is nobody's submodule (never saved) and carries no
    hook, nor harden's forward."""
    shared = {id(t): t for t in [*layer.parameters(recurse=True), *layer.buffers(recurse=True)]}
    return copy_without_hooks(layer, shared, RUN_HOOKS + STATE_HOOKS)


@register_patch_kind("lora", placement="layer", config_cls=LoraConfig)
class Lora(PatchKind):
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = LAYER_TYPES

    def __init__(self, weight_shape: list[int], config: LoraConfig, out_shape: list[int] | None = None) -> None:
        """A delta for a weight of `weight_shape`; with `out_shape` (an attention layer: `weight_shape` is its
        `in_proj_weight`'s), a second one for `out_proj.weight`."""
        super().__init__()
        self.config = config
        self.weight_shape = [int(v) for v in weight_shape]
        self.out_shape = None if out_shape is None else [int(v) for v in out_shape]
        self.down, self.up = self._factors(self.weight_shape, config.rank)  # A, B
        if self.out_shape is not None:
            self.down_out, self.up_out = self._factors(self.out_shape, config.rank)
        self.strength = 1.0
        self._merged: tuple | None = None
        self._key: tuple | None = None
        self._stand: nn.Module | None = None  # an attention layer's stand-in (`_stand_in`), never saved

    @staticmethod
    def _factors(shape: list[int], rank: int) -> tuple[nn.Parameter, nn.Parameter]:
        down = nn.Parameter(torch.empty(rank, math.prod(shape[1:])))  # A
        up = nn.Parameter(torch.zeros(shape[0], rank))  # B: zero, so the delta starts at zero
        if not down.is_meta:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear's own initialisation
        return down, up

    @classmethod
    def build(cls, site: Site, config: LoraConfig) -> PatchKind:
        why = layer_ok(site.module)
        if why:
            raise InputError(f"'{site.name}' {why}: lora patches go on {LAYER_WORDS} layers")
        shapes = [list(w.shape) for w in _weights(site.module)]
        return cls(shapes[0], config, shapes[1] if len(shapes) > 1 else None)

    def extra_spec(self) -> dict[str, Any]:
        spec = {"weight_shape": list(self.weight_shape), "rank": self.config.rank}
        if self.out_shape is not None:  # written only for attention, so earlier checkpoints read the same
            spec["out_shape"] = list(self.out_shape)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Lora":
        return cls(spec["weight_shape"], LoraConfig(rank=spec["rank"]), spec.get("out_shape"))

    @classmethod
    def restore(cls, spec: dict[str, Any], module: nn.Module | None) -> "Lora":
        """The patch at the base's layer `module`, which must be a layer of the recorded weight shape(s)."""
        site = spec.get("site", "?")
        why = layer_ok(module) if module is not None else "is the model input"
        if why:
            raise InputError(f"manifest puts a lora patch at '{site}', which {why}")
        got = [list(w.shape) for w in _weights(module)]
        want = [list(spec["weight_shape"])] + ([list(spec["out_shape"])] if spec.get("out_shape") is not None else [])
        if got != want:
            what = "a weight of shape" if len(want) == 1 else "weights of shapes"
            raise InputError(f"manifest's lora patch at '{site}' is for {what} {' and '.join(map(str, want))}, but "
                             f"the model's {type(module).__name__} there has {' and '.join(map(str, got))}: is this "
                             "the architecture the model was patched with?")
        return cls.from_spec(spec)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"weight_shape": (_weight_shape, "must be a list of 2 to 5 positive sizes"),
                "rank": (V.int_in(1, 4096), "must be an integer in 1..4096"),
                "out_shape": (lambda v: v is None or (_weight_shape(v) and len(v) == 2),
                              "must be null or a list of 2 positive sizes", None)}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        shapes = [spec["weight_shape"]] + ([spec["out_shape"]] if spec.get("out_shape") is not None else [])
        return sum(spec["rank"] * (shape[0] + math.prod(shape[1:])) for shape in shapes)

    @property
    def uses_base(self) -> bool:
        """Route adv needs the base layer's own output only at strength 0 (the base, exactly)."""
        return self.strength == 0

    def _pairs(self) -> list:
        """(B, A, weight shape) per delta, tensors through `_parameters`, not attribute access: nn.Module's
        `__getattr__` costs about 1 µs a name, and this runs per layer per forward."""
        params = self._parameters
        if self.out_shape is None:
            return [(params["up"], params["down"], self.weight_shape)]
        return [(params["up"], params["down"], self.weight_shape), (params["up_out"], params["down_out"],
                                                                    self.out_shape)]

    def weights(self, layer: nn.Module) -> tuple:
        """The weights route adv runs the layer with: W + s·B·A per delta, merged once and kept while nothing they
        depend on changes, computed in the forward while A or B may receive gradients."""
        pairs = self._pairs()
        if isinstance(layer, nn.MultiheadAttention):
            ws = [layer._parameters["in_proj_weight"], layer._modules["out_proj"]._parameters["weight"]]
        else:  # a weight outside `_parameters` (a parametrisation's) is read as an attribute
            w = layer._parameters.get("weight")
            ws = [layer.weight if w is None else w]
        if torch.is_grad_enabled() and any(up.requires_grad or down.requires_grad for up, down, _ in pairs):
            return self._merge(ws, pairs)
        key = [self.strength]  # (a loop, not comprehensions: each is a frame, and this runs per layer per forward)
        for w in ws:
            key += (w.data_ptr(), w._version, w.dtype)
        for up, down, _ in pairs:
            key += (up.data_ptr(), up._version, down.data_ptr(), down._version)
        if self._key != key or self._merged is None:
            with torch.no_grad():
                self._merged = self._merge(ws, pairs)
            self._key = key
        return self._merged

    def _merge(self, ws: list, pairs: list) -> tuple:
        """W + s·B·A for each weight and its factors (`_pairs`)."""
        s = self.strength
        return tuple(w + (s * (up @ down).view(shape)).to(w.dtype) for w, (up, down, shape) in zip(ws, pairs))

    def forward(self, out: Any, inp: torch.Tensor, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Route adv's output of `layer` on its input `inp` (and the layer's other arguments: an attention layer's
        key and value...); `out`, the layer's own output, only at strength 0."""
        if self.strength == 0:
            return out
        ws = self.weights(layer)
        if isinstance(layer, nn.MultiheadAttention):
            return self._attend(layer, ws, inp, args, kwargs)
        bias = layer._parameters["bias"] if "bias" in layer._parameters else layer.bias
        if isinstance(layer, nn.Linear):
            return F.linear(inp, ws[0], bias)
        return layer._conv_forward(inp, ws[0], bias)

    def _attend(self, layer: nn.Module, ws: tuple, inp: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The attention layer's own forward, run on its stand-in (`_stand_in`) carrying the weights `ws` (the kept
        merge, or while the deltas train the ones this forward computed)."""
        stand = self._stand
        if stand is None or stand.__dict__.get("_harden_of") is not layer:  # through __dict__: an attribute
            stand = self.__dict__["_stand"] = _stand_in(layer)  # assignment would make it a submodule, and saved
            stand.__dict__["_harden_of"] = layer
        out_proj = stand._modules["out_proj"]
        stand._parameters.update(layer._parameters)  # the layer's tensors as they are now (a load may replace them)
        out_proj._parameters.update(layer._modules["out_proj"]._parameters)
        stand._parameters["in_proj_weight"] = ws[0]
        out_proj._parameters["weight"] = ws[1]
        if stand.training != layer.training:  # (nn.Module's __setattr__ costs a few µs: only when it changes)
            stand.training = layer.training
        return stand.forward(inp, *args, **kwargs)  # it has no hooks: the layer's own call ran those

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_merged"], state["_key"], state["_stand"] = None, None, None  # a copy merges its own
        return state
