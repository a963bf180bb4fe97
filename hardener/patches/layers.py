"""Discover named layers: output shapes, call counts, parameter counts, valid patch sites.

A site is a module's output computed once per forward, in one of two layouts: a channels-first feature map
(N,C,H,W: `map`) or a token tensor (N,L,D, features on the last axis: `tokens`, a transformer block's output; a
channels-last trunk's N,H,W,C map, as in Swin, is tokens on an H,W grid). Channels-last maps are found by following
the channel axis through the forward's function calls (`ChannelAxes`), not by module types alone; outputs whose first
axis is not the batch (attention windows) are no sites. Which kinds serve which layout is each patch kind's
`layouts`."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode

from ..errors import InputError
from ..model.classifier import Classifier
from .base import LAYOUT_WORDS, MAP, TOKENS  # noqa: F401  (LAYOUT_WORDS: what each layout is, in words)
from .cost import count
from .sites import suggest_sites  # noqa: F401  (moved there: site parsing and suggestion in one module)


@dataclass
class LayerInfo:
    name: str
    type: str
    params: int
    calls: int
    shape: list[int] | None  # output shape without the batch dimension
    site: bool
    reason: str  # why it is not a patch site ("" for sites)
    nonnegative: bool | None = None
    layout: str | None = None  # a site's layout: "map" (N,C,H,W) or "tokens" (N,L,D); None for no site
    order: int | None = None  # when its first call finished, counted over the modules of the forward

    def to_json(self) -> dict:
        return asdict(self)


def probe(model: Classifier, x: torch.Tensor) -> list[LayerInfo]:
    """One forward on `x` with a hook on every named module of model.net."""
    calls: dict[str, int] = {}
    shapes: dict[str, list[int] | None] = {}
    nonneg: dict[str, bool] = {}
    finished: dict[str, int] = {}  # module name -> when its first call finished
    axes = ChannelAxes()
    layouts = Layouts(axes)
    handles = []
    named = [(n, m) for n, m in model.net.named_modules() if n]

    def make(name: str):
        def hook(m, inp, out):
            calls[name] = calls.get(name, 0) + 1
            finished.setdefault(name, len(finished))
            if isinstance(out, torch.Tensor):
                shapes[name] = list(out.shape[1:])
                nonneg[name] = nonneg.get(name, True) and bool((out >= 0).all())
                layouts.see(name, m, inp, out)
                if out.ndim and out.shape[0] != len(x):
                    layouts.last[name] = (f"its first axis holds {out.shape[0]} rows for a batch of {len(x)} (windows "
                                          "or tokens folded into the batch), not one per image")
            else:
                shapes[name] = None
        return hook

    for name, m in named:
        handles.append(m.register_forward_hook(make(name)))
    try:
        with torch.no_grad(), axes:
            model(x)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is an input mismatch
        raise InputError(f"the model fails on input of shape {tuple(x.shape[1:])}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0]} (check --input-shape, --resize or the data)") from None
    finally:
        for h in handles:
            h.remove()
    attention = attention_modules(model.net, shapes)
    grid = layouts.grids(shapes)
    infos = []
    for name, m in named:
        ok, why = _verdict(name, calls.get(name, 0), shapes.get(name), attention, layouts)
        if not ok and name in grid and why == layouts.last.get(name):
            ok, why = True, ""  # a channels-last trunk's map: tokens on an H,W grid (a token fixer takes it as it is)
        layout = (MAP if len(shapes[name]) == 3 and name not in grid else TOKENS) if ok else None
        infos.append(LayerInfo(name, type(m).__name__, sum(p.numel() for p in m.parameters()),
                               calls.get(name, 0), shapes.get(name), ok, why, nonneg.get(name), layout,
                               finished.get(name)))
    return infos


def site_shape(info: LayerInfo) -> list[int] | None:
    """The shape a patch is built for at a site: C,H,W for a map, L,D for tokens (an H,W grid of tokens, a
    channels-last trunk's map, is H·W tokens: a token fixer acts on its last axis as it is)."""
    if info.layout == TOKENS and info.shape is not None and len(info.shape) == 3:
        return [info.shape[0] * info.shape[1], info.shape[2]]
    return info.shape


def _verdict(name: str, n_calls: int, shape: list[int] | None, attention: list[str],
             layouts: "Layouts") -> tuple[bool, str]:
    """Whether a module's output is a patch site (a channels-first feature map or a token tensor, once per
    forward), and why not."""
    if n_calls == 0:
        return False, "not called"
    if n_calls > 1:
        return False, f"called {n_calls}x per forward (shared module)"
    if shape is None:
        return False, "output is not a tensor"
    if len(shape) not in (2, 3):
        return False, f"{len(shape) + 1}-D output, not a feature map or tokens"
    inside = next((a for a in attention if name.startswith(a + ".")), None)
    if inside is not None:
        return False, f"inside attention '{inside}' (queries, keys, values, heads: not a feature map or tokens)"
    if name in layouts.last:
        return False, layouts.last[name]
    return True, ""


ATTENTION_NAMES = ("attn", "attention", "self_attn", "self_attention", "cross_attn")


def attention_modules(net: nn.Module, shapes: dict[str, list[int] | None]) -> list[str]:
    """Names of attention modules, whose internals are head-split tensors, never feature maps: nn.MultiheadAttention,
    a layer named `attn`, `attention`, ..., or a class named *Attention*/*Attn* that does not output a feature map
    (a model class so named that wraps a whole CNN is no attention layer)."""
    out = []
    for name, m in net.named_modules():
        cls = type(m).__name__.lower()
        tokens = shapes.get(name) is None or len(shapes[name]) != 3
        if name and (isinstance(m, nn.MultiheadAttention) or name.rsplit(".", 1)[-1].lower() in ATTENTION_NAMES
                     or (tokens and ("attention" in cls or "attn" in cls))):
            out.append(name)
    return out


class Layouts:
    """Which 4-D outputs are channels-last (N,H,W,C), found during the dry run: ConvNeXt-style blocks permute a map
    to channels-last around LayerNorm and Linear layers, and a 4-D tensor whose last axis is the channels is not a
    channels-first feature map (a fixer there would treat the height axis as channels).

    Rules, per module output: a Linear on a 4-D input acts on its last axis; a LayerNorm over the last axis of a
    4-D input whose axis 1 is not that size (or exactly nn.LayerNorm, which always normalises the last axis); a view
    of its input with the channel axis moved off axis 1 (a Permute module: one back from channels-last is a map
    again); an output the same shape as a channels-last input, or the very tensor a submodule marked.

    Likewise, which 3-D outputs are channels-first (N,C,L) rather than tokens (N,L,D), whose last axis is the
    features a token fixer mixes (`_why_sequence`)."""

    def __init__(self, axes: "ChannelAxes | None" = None) -> None:
        self.marked: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (the tensor, kept alive so ids stay unique; why)
        self.last: dict[str, str] = {}  # module name -> why its output is in the wrong layout for a site
        self.axes = axes  # the channel axis of each tensor, followed through the forward's function calls

    def grids(self, shapes: dict[str, list[int] | None]) -> set[str]:
        """The channels-last (N,H,W,C) outputs of a channels-last trunk (timm and torchvision Swin): no enclosing
        module outputs a channels-first map. Token kinds patch them as they are (tokens on an H,W grid); inside a
        channels-first block (ConvNeXt's, MaxViT's) they stay no site: the block's own output is the map site."""
        def channels_first(n: str) -> bool:
            shape = shapes.get(n)
            return shape is not None and len(shape) == 3 and not self.last.get(n, "").startswith("channels-last")

        out = set()
        for name, why in self.last.items():
            parts = name.split(".")
            if why.startswith("channels-last (N,H,W,C)") and len(shapes.get(name) or []) == 3 and \
                    not any(channels_first(".".join(parts[:k])) for k in range(1, len(parts))):
                out.add(name)
        return out

    def see(self, name: str, module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if out.ndim not in (3, 4):
            return
        x = next((t for t in inp if isinstance(t, torch.Tensor)), None)
        why = self._why(module, x, out) if out.ndim == 4 else self._why_sequence(module, x, out)
        if why:
            self.marked[id(out)] = (out, why)
            self.last[name] = why
        else:
            self.last.pop(name, None)

    def _why(self, module: nn.Module, x: torch.Tensor | None, out: torch.Tensor) -> str:
        if id(out) in self.marked:
            return self.marked[id(out)][1]
        if self.axes is not None and self.axes.get(out) == 3:
            return "channels-last (N,H,W,C): its channels are on the last axis (followed through the forward's permutes)"
        if x is None or x.ndim != 4:
            return ""
        if isinstance(module, nn.Linear):
            return "channels-last (N,H,W,C): a Linear on a 4-D input acts on its last axis"
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            c = module.normalized_shape[0]
            if x.shape[-1] == c and (type(module) is nn.LayerNorm or x.shape[1] != c):
                return "channels-last (N,H,W,C): a LayerNorm over the last axis of a 4-D input"
        x_marked = id(x) in self.marked
        if _is_view(x, out):
            if out.shape[1] == x.shape[1] and out.stride(1) == x.stride(1):
                return self.marked[id(x)][1] if x_marked else ""
            return "" if x_marked else "channels-last (N,H,W,C): a permuted view of a channels-first map"
        if x_marked and out.shape == x.shape:
            return "channels-last (N,H,W,C), like its input"
        return ""

    def _why_sequence(self, module: nn.Module, x: torch.Tensor | None, out: torch.Tensor) -> str:
        """Why a 3-D output is channels-first (N,C,L), not tokens (N,L,D) ('' for tokens): a 1-D convolution's or
        a norm over axis 1's output, a flattened feature map, a permuted view of tokens, an output the same shape as
        a channels-first input (an activation, a dropout), or the very tensor a submodule marked."""
        if id(out) in self.marked:
            return self.marked[id(out)][1]
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            return "channels-first (N,C,L): a 1-D convolution's output, not tokens"
        if x is None or isinstance(module, (nn.Linear, nn.LayerNorm)):
            return ""
        if x.ndim == 3 and isinstance(module, (_BatchNorm, nn.GroupNorm, _InstanceNorm)):
            return "channels-first (N,C,L): a norm over axis 1 of a 3-D input, not tokens"
        if x.ndim == 4 and isinstance(module, nn.Flatten) and out.shape[1] == x.shape[1] and id(x) not in self.marked:
            return "channels-first (N,C,L): a flattened feature map, not tokens"
        if x.ndim != 3:
            return ""
        x_marked = id(x) in self.marked
        if _is_view(x, out):
            return "" if x_marked else "channels-first (N,C,L): a permuted view of tokens"
        return self.marked[id(x)][1] if x_marked and out.shape == x.shape else ""


class ChannelAxes(TorchFunctionMode):
    """Which axis of each tensor holds the channels, followed through every torch function of one forward: the
    input's is axis 1; convolutions, batch/group/instance norms and pools keep or put it at axis 1, `linear` and
    `layer_norm` at the last axis; permutes, transposes and reshapes that keep the last (or the first two) axes move
    it along; a matrix product takes its right operand's last axis; elementwise results take an input's of the same
    shape. Unknown where no rule applies. A model that permutes a map to channels-last with a function call
    (timm's Swin windows, MaxViT's partitions) is seen so where its modules alone would not show it."""

    FIRST = ("conv", "batch_norm", "group_norm", "instance_norm", "pool", "interpolate", "upsample", "pixel_")
    LAST = ("linear", "layer_norm", "rms_norm")
    MOVES = ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis")
    SHAPES = ("view", "reshape", "flatten", "unflatten", "contiguous", "expand", "clone", "to", "__getitem__", "roll",
              "chunk", "split", "unbind", "pad")

    def __init__(self) -> None:
        super().__init__()
        self.axis: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (the tensor, kept alive so ids stay unique; axis)

    def get(self, t: torch.Tensor) -> int | None:
        hit = self.axis.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def __enter__(self):
        self.axis.clear()
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        if outs and torch.is_tensor(args[0] if args else None) and not self.axis and args[0].ndim == 4:
            self.axis[id(args[0])] = (args[0], 1)  # the model's (normalised) input: N,C,H,W
        try:
            for t in outs:
                a = self._rule(getattr(func, "__name__", ""), args, kwargs or {}, t)
                if a is not None and 0 <= a < t.ndim:
                    self.axis[id(t)] = (t, a)
        except (TypeError, ValueError, IndexError):  # an argument form no rule expects: the axis stays unknown
            pass
        return out

    def _rule(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> int | None:
        x = args[0] if args and torch.is_tensor(args[0]) else None
        a = self.get(x) if x is not None else None
        if any(w in name for w in self.FIRST) and out.ndim >= 3:
            return 1
        if any(w in name for w in self.LAST):
            return out.ndim - 1
        if name in ("matmul", "__matmul__", "bmm", "__rmatmul__"):
            other = args[1] if len(args) > 1 and torch.is_tensor(args[1]) else None
            return out.ndim - 1 if other is not None and self.get(other) == other.ndim - 1 else None
        if a is None:
            if name in ("cat", "stack", "concat") and args and isinstance(args[0], (list, tuple)) and args[0]:
                first = args[0][0]
                return self.get(first) if torch.is_tensor(first) and first.ndim == out.ndim else None
            same = [self.get(t) for t in args if torch.is_tensor(t) and t.shape == out.shape]
            return next((v for v in same if v is not None), None)
        if name in self.MOVES:
            dims = [d for d in args[1:] if isinstance(d, int)] or [d for v in args[1:] for d in v] or \
                list(kwargs.get("dims", ()))
            dims = [d % x.ndim for d in dims]
            if name == "permute":
                return dims.index(a)
            if len(dims) == 2:
                return {dims[0]: dims[1], dims[1]: dims[0]}.get(a, a)
            return None
        if name in self.SHAPES or out.shape == x.shape:
            if out.shape == x.shape:
                return a
            if a == x.ndim - 1 and out.shape[-1] == x.shape[-1]:
                return out.ndim - 1
            if a == 1 and out.ndim >= 2 and x.ndim >= 2 and out.shape[:2] == x.shape[:2]:
                return 1
        return None


def _is_view(x: torch.Tensor, out: torch.Tensor) -> bool:
    """`out` is a re-ordered view of `x` (same storage, its axes permuted)."""
    try:
        same = out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    except RuntimeError:
        return False
    return same and sorted(out.shape) == sorted(x.shape) and (out.shape != x.shape or out.stride() != x.stride())


def patch_cost(patched) -> dict[str, int]:
    """What the patches add to the base (a `PatchedModel`): trainable parameters, and multiply-adds per image counted
    by torch at the recorded input shape (`cost.count`: functional ops and attention included), beside the base's."""
    return count(patched).added()


def describe_cost(cost: dict[str, int]) -> str:
    """One line: parameters and multiply-adds the patches add, against the base's."""
    def n(v: float) -> str:
        return next((f"{v / d:.1f}{u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if v >= d), f"{v:.0f}")

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f}%" if b else "—"

    return (f"patch cost: {cost['parameters']:,} parameters ({pct(cost['parameters'], cost['base_parameters'])} of "
            f"the base's {cost['base_parameters']:,}), {n(cost['macs'])} multiply-adds per image "
            f"({pct(cost['macs'], cost['base_macs'])} of the base's {n(cost['base_macs'])})")
