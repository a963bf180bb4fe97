"""Feature-denoising block (Xie et al., thesis ch. 4): h -> h + strength · conv1x1(denoise(h)).

The 1×1 conv is zero-initialised, so the patched model starts exactly equal to the base.
Denoising operations: non-local means over all positions (Gaussian/softmax with 1×1 embeddings,
or dot product without), and 3×3 mean, median and bilateral (Gaussian weights) filters.
Non-local means cost memory ∝ (HW)²: the Gaussian version is computed in chunks of query
positions, the dot-product one as (X Xᵀ) X / N, which never forms the (HW)² matrix.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options import validate as V
from ..options.choices import DENOISE_OPS as OPS
from ..options.kind_options import DenoiseConfig
from .base import CHANNELS, PatchKind, Site, choice, register_patch_kind

MAX_POSITIONS = 65536  # H*W above which non-local Gaussian is refused (chunks would still be huge)


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """3×3 neighbourhoods with replicated borders: N,C,H,W -> N,C,9,H,W."""
    n, c, h, w = x.shape
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.unfold(p, 3).view(n, c, 9, h, w)


@register_patch_kind("denoise", placement="output", config_cls=DenoiseConfig)
class Denoise(PatchKind):
    may_mask = True  # median/bilateral filters can hide gradients: evaluation attacks it with BPDA too

    def __init__(self, channels: int, config: DenoiseConfig, spatial: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        if config.op == "nonlocal-gaussian":
            if spatial is not None and spatial[0] * spatial[1] > MAX_POSITIONS:
                raise InputError(f"non-local means at a {spatial[0]}x{spatial[1]} feature map needs "
                                 f"({spatial[0] * spatial[1]})² weights per image: pick a deeper site or "
                                 "--denoise nonlocal-dot / a local filter")
            d = max(1, channels // 2)
            self.theta = nn.Conv2d(channels, d, 1, bias=False)
            self.phi = nn.Conv2d(channels, d, 1, bias=False)
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        return {"channels": self.conv.out_channels, "op": self.config.op, "chunk": self.config.chunk}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Denoise":
        return cls(spec["channels"], DenoiseConfig(op=spec["op"], chunk=spec.get("chunk", 1024)))

    @classmethod
    def build(cls, site: Site, config: DenoiseConfig) -> "Denoise":
        return cls(site.shape[0], config, tuple(site.shape[1:3]))

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"channels": CHANNELS, "op": choice(OPS),
                "chunk": (V.int_in(1, 1 << 20), "must be an integer in 1..1048576", 1024)}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c = spec["channels"]
        return (2 * c * max(1, c // 2) if spec["op"] == "nonlocal-gaussian" else 0) + c * c + c

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        op = self.config.op
        n, c, h, w = x.shape
        if op == "mean":
            return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        if op == "median":
            return _neighbours(x).median(dim=2).values
        if op == "bilateral":
            nb = _neighbours(x)  # N,C,9,H,W
            weights = torch.softmax((nb * x.unsqueeze(2)).sum(1, keepdim=True) / math.sqrt(c), dim=2)
            return (weights * nb).sum(2)
        flat = x.flatten(2)  # N,C,L
        if op == "nonlocal-dot":
            return (torch.bmm(flat, flat.transpose(1, 2)) @ flat / flat.shape[2]).view_as(x)
        q = self.theta(x).flatten(2).transpose(1, 2)  # N,L,d
        k = self.phi(x).flatten(2)  # N,d,L
        scale = 1 / math.sqrt(q.shape[2])
        out = []
        for i in range(0, q.shape[1], self.config.chunk):
            attn = torch.softmax(torch.bmm(q[:, i:i + self.config.chunk], k) * scale, dim=2)  # N,chunk,L
            out.append(torch.bmm(attn, flat.transpose(1, 2)))  # N,chunk,C
        return torch.cat(out, 1).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.strength * self.conv(self.denoise(h))
