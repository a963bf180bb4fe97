"""Fixer module (fixer paper §3.1, Table 7): h -> h + strength·δ·φ(h), optional final ReLU.

φ = ζ(conv3x3(ReLU(conv1x1(h)))) − ζ(0), with the 3×3 conv zero-initialised, so φ ≡ 0 at the
start for every ζ and the patched model starts exactly equal to the base. With `rank` r > 0 (`--fixer-rank`) the 3×3
conv is factored: a 3×3 conv to r channels, then a zero-initialised 1×1 conv to C (9·h·r + r·C multiply-adds per
position instead of 9·h·C); the manifest names `rank` only when it is set, so earlier checkpoints read the same.

At a token site (N,L,D: a transformer block's output) the fixer is the token fixer, a residual bottleneck MLP over
the feature axis applied to every token: φ = ζ(W2·GELU(W1·LN(h))) − ζ(0), W1: D -> D/ρ, W2: D/ρ -> D zero-initialised
(LN: a LayerNorm of its own, as in a pre-norm transformer block). `--method fixer` (and `auto`, `stem`) builds it
wherever the site holds tokens; its manifest kind is `token-fixer`, which `--at token-fixer:SITE` names directly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options import validate as V
from ..options.kind_options import FixerConfig
from .base import BOOL, CHANNELS, FINITE, PatchKind, Site, choice, register_patch_kind

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda z: z,
    "tanh": torch.tanh,
    "silu": F.silu,
    "softplus": F.softplus,
    "gelu": F.gelu,
}


@register_patch_kind("fixer", placement="output", config_cls=FixerConfig)
class Fixer(PatchKind):
    layouts = ("map", "tokens")  # at token sites `build` makes a TokenFixer

    def __init__(self, channels: int, config: FixerConfig) -> None:
        super().__init__()
        self.config = config
        hidden = width_at(channels, config.rho)
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, config.rank or channels, 3, padding=1)
        self.conv2_up = nn.Conv2d(config.rank, channels, 1) if config.rank else None  # factored: the last layer
        last = self.conv2_up or self.conv2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.strength = 1.0
        act = ACTIVATIONS[config.act]
        self._act = act
        self._act0 = float(act(torch.zeros((), device="cpu")))  # a number, also when built on meta

    @classmethod
    def build(cls, site: Site, config: FixerConfig) -> PatchKind:
        """A conv fixer at a feature map (C,H,W), a token fixer at tokens (L,D)."""
        return TokenFixer.build(site, config) if len(site.shape) == 2 else cls(site.shape[0], config)

    def extra_spec(self) -> dict[str, Any]:
        spec = {"channels": self.channels, "rho": self.config.rho, "delta": self.config.delta,
                "act": self.config.act, "final_relu": self.config.final_relu}
        return {**spec, "rank": self.config.rank} if self.config.rank else spec

    @classmethod
    def check_site(cls, info: Any, config: FixerConfig) -> None:
        if config.final_relu and not info.nonnegative:
            raise InputError(f"--final-relu needs non-negative features, but '{info.name}' outputs negative values "
                             "(on a dry run); drop --final-relu or choose a site after a ReLU")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Fixer":
        cfg = FixerConfig(rho=spec["rho"], delta=spec["delta"], act=spec["act"], final_relu=spec["final_relu"],
                          rank=spec.get("rank", 0))
        return cls(spec["channels"], cfg)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"channels": CHANNELS, "rho": (V.number(0, 1e6, open_lo=True), "must be a positive number"),
                "delta": FINITE, "act": choice(ACTIVATIONS), "final_relu": BOOL,
                "rank": (V.int_in(0, V.MAX_CHANNELS), f"must be an integer in 0..{V.MAX_CHANNELS}", 0)}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c, h, r = spec["channels"], _hidden(spec), spec.get("rank", 0)
        return c * h + h + (h * r * 9 + r + r * c + c if r else h * c * 9 + c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.conv2(F.relu(self.conv1(h), inplace=True))  # in place: a fresh tensor no backward keeps
        if self.conv2_up is not None:
            z = self.conv2_up(z)
        out = h + _scaled(self._act(z), self._act0, self.strength * self.config.delta)
        return F.relu(out) if self.config.final_relu else out


def _scaled(a: torch.Tensor, a0: float, scale: float) -> torch.Tensor:
    """scale·(a − a0), leaving out the passes that change no bit (issue 30: each is a pass over the feature map):
    x − 0 and 1·x are x exactly, forward and backward."""
    if a0 != 0:
        a = a - a0
    return a if scale == 1 else scale * a


def width_at(channels: int, rho: float) -> int:
    """A fixer's hidden width over `channels` channels (or features) at reduction `rho`."""
    return max(1, int(channels // rho))


def hidden_width(shape: Any, rho: float) -> int | None:
    """A fixer's hidden width at a site of `shape` (C,H,W: C channels; L,D: D features), as `Fixer` and `TokenFixer`
    build it; None for another shape."""
    if not shape or len(shape) not in (2, 3):
        return None
    return width_at(shape[0 if len(shape) == 3 else -1], rho)


def _hidden(spec: dict[str, Any]) -> int:
    """Hidden width of a stored fixer spec, refused when a tiny rho would ask for a huge one."""
    hidden_f = spec["channels"] / spec["rho"]
    if hidden_f > 1 << 24:
        raise InputError(f"manifest patch at '{spec['site']}': rho {spec['rho']} asks for {hidden_f:.3g} "
                         "hidden channels")
    return width_at(spec["channels"], spec["rho"])


@register_patch_kind("token-fixer", placement="output", config_cls=FixerConfig)
class TokenFixer(PatchKind):
    """h -> h + strength·δ·(ζ(W2·GELU(W1·LN(h))) − ζ(0)) on every token of an N,L,D tensor, W2 zero-initialised."""

    layouts = ("tokens",)

    def __init__(self, channels: int, config: FixerConfig) -> None:
        super().__init__()
        self.config = config
        self.channels = channels
        hidden = width_at(channels, config.rho)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.strength = 1.0
        self._act = ACTIVATIONS[config.act]
        self._act0 = float(self._act(torch.zeros((), device="cpu")))

    @classmethod
    def build(cls, site: Site, config: FixerConfig) -> "TokenFixer":
        if config.rank:
            raise InputError(f"--fixer-rank factors the 3x3 conv of a fixer on a feature map; '{site.name}' holds "
                             "tokens, whose fixer is a bottleneck MLP already: give --rho instead")
        return cls(site.shape[-1], config)

    def extra_spec(self) -> dict[str, Any]:
        return {"channels": self.channels, "rho": self.config.rho, "delta": self.config.delta,
                "act": self.config.act, "final_relu": self.config.final_relu}

    @classmethod
    def check_site(cls, info: Any, config: FixerConfig) -> None:
        Fixer.check_site(info, config)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return Fixer.spec_fields()

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TokenFixer":
        cfg = FixerConfig(rho=spec["rho"], delta=spec["delta"], act=spec["act"], final_relu=spec["final_relu"])
        return cls(spec["channels"], cfg)

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c, h = spec["channels"], _hidden(spec)
        return 2 * c + c * h + h + h * c + c

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.gelu(self.fc1(self.norm(h))))
        out = h + _scaled(self._act(z), self._act0, self.strength * self.config.delta)
        return F.relu(out) if self.config.final_relu else out
