"""Pre-filter at the model input (site `input`, after normalisation): x -> x + strength·δ·g(x).

g = conv3x3(ReLU(conv3x3(ReLU(conv3x3(x))))) with `width` channels inside and the last conv
zero-initialised, so the patched model starts exactly equal to the base. With `stride` s > 1 the
first conv strides by s, the middle one runs at 1/s of the resolution (1/s² of its multiply-adds,
the bulk of the cost) and its output is upsampled (nearest) back before the last conv. Plain convolutions and
ReLUs: it cannot quantise its input, so it cannot hide gradients the way a rounding front-end does
(evaluate it with Square and the gradient-masking checks all the same).

Lighter designs (`design`, `--prefilter-design`; the manifest names one only when it is not "plain", so earlier
checkpoints read the same):
- "separable": the middle conv depthwise-separable (a depthwise 3x3, then a pointwise 1x1, no activation between),
  9w + w² multiply-adds per position instead of 9w²;
- "shuffle": every conv at 1/s of the resolution (s = the stride, 2 or more): the first conv strides by s, the last
  outputs C·s² channels and `F.pixel_shuffle(s)` lays them out at full resolution again (a learned upsampling,
  instead of nearest before a full-resolution last conv), cropped to the input's size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options import validate as V
from ..options.choices import PREFILTER_DESIGNS as DESIGNS
from ..options.kind_options import PrefilterConfig
from .base import CHANNELS, FINITE, PatchKind, Site, choice, register_patch_kind


def _check_design(design: str, stride: int) -> None:
    if design not in DESIGNS:
        raise InputError(f"--prefilter-design must be one of {', '.join(DESIGNS)}, got '{design}'")
    if design == "shuffle" and stride < 2:
        raise InputError("--prefilter-design shuffle works at 1/S of the resolution: give --prefilter-stride 2 or more")


def lighter_settings(width: int, stride: int, design: str) -> list[list[dict[str, Any]]]:
    """What `--budget` may make of a pre-filter, resolution before width: one inner list per design, in the order
    the budget tries them (the first with a width that fits wins, at its largest such width): the recipe's own
    setting, shuffle at stride 2, separable at strides 1 and 2, shuffle at stride 4; each at widths from the given
    one down, in steps of a quarter to a third (powers of two and 1.5x them: 64, 48, 32, 24, 16, 12, 8; not below 8),
    so that a budget keeps the widest that fits (vgg_silu_small: 12 fits 1.25x where 16 does not). The order is
    measured (issue 30, bench/RESULTS.md "Light patches"): at 1.2-1.24x the example's multiply-adds, a full-resolution
    width-16 pre-filter kept 58.0% validation PGD-10, a stride-2 shuffle at width 32 56.2%, a stride-4 shuffle at
    width 64 54.0%."""
    ladder = {m << i for i in range(12) for m in (2, 3)}  # 2, 3, 4, 6, 8, 12, 16, 24, ...
    widths = [width, *sorted((w for w in ladder if 8 <= w < width), reverse=True)] if width > 8 else [width]
    order = [(design, stride), ("shuffle", 2), ("separable", 1), ("separable", 2), ("shuffle", 4)]
    return [[{"width": w, "prefilter_design": d, "prefilter_stride": s} for w in widths]
            for i, (d, s) in enumerate(order) if (d, s) not in order[:i]]


@register_patch_kind("prefilter", placement="input", config_cls=PrefilterConfig)
class Prefilter(PatchKind):
    may_mask = True  # an input transform: evaluation attacks it with BPDA too (identity in the backward pass)
    # On the CPU the hidden layers run channels-last (NHWC), handed back in the base's layout, from batch 16 on or at
    # width 64 and more: oneDNN's convolutions over few channels are faster in it there (bench/prefilter_layout.py,
    # quiet, one thread: at batch 256 the heavy default from 3.47x the example base's latency to 3.06x, the light
    # preset by 0.03-0.10; at batch 1 the width-64 default by 0.07). At batch 1 and width 16 the two layout copies
    # cost more than they save (131 µs NCHW, 158 µs channels-last, issue 30), and a training step measured the same.
    # The bench turns it off to compare.
    channels_last = True
    CHANNELS_LAST_BATCH, CHANNELS_LAST_WIDTH = 16, 64

    def __init__(self, channels: int, width: int = 32, delta: float = 1.0, stride: int = 1,
                 design: str = "plain") -> None:
        super().__init__()
        if width < 1:
            raise InputError(f"--width must be at least 1, got {width}")
        _check_design(design, stride)
        self.delta, self.stride, self.design, self.channels = delta, stride, design, channels
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, stride=stride)
        if design == "separable":  # depthwise, then pointwise
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=width)
            self.conv2_pw = nn.Conv2d(width, width, 1)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        out = channels * stride * stride if design == "shuffle" else channels
        self.conv3 = nn.Conv2d(width, out, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)
        self.strength = 1.0

    def extra_spec(self) -> dict[str, Any]:
        spec = {"channels": self.conv1.in_channels, "width": self.conv1.out_channels, "delta": self.delta}
        if self.stride != 1:  # written only when used, so checkpoints of earlier versions read the same
            spec["stride"] = self.stride
        if self.design != "plain":
            spec["design"] = self.design
        return spec

    @classmethod
    def build(cls, site: Site, config: PrefilterConfig) -> "Prefilter":
        return cls(site.shape[0], config.width, config.delta, config.stride, config.design)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Prefilter":
        return cls(spec["channels"], spec["width"], spec["delta"], spec.get("stride", 1), spec.get("design", "plain"))

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        return {"channels": CHANNELS, "width": (V.int_in(1, 4096), "must be an integer in 1..4096"), "delta": FINITE,
                "stride": (V.int_in(1, 8), "must be an integer in 1..8", 1), "design": (*choice(DESIGNS), "plain")}

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        c, w, s = spec["channels"], spec["width"], spec.get("stride", 1)
        design = spec.get("design", "plain")
        middle = w * 9 + w + w * w + w if design == "separable" else w * w * 9 + w
        out = c * s * s if design == "shuffle" else c
        return c * w * 9 + w + middle + w * out * 9 + out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=True)  # in place: fresh tensors no backward keeps
        cl = (self.channels_last and x.device.type == "cpu"  # traced or exported: by width only (a dynamic batch
              and (h.shape[1] >= self.CHANNELS_LAST_WIDTH  # is not a constant to branch on)
                   or (not (torch.jit.is_tracing() or torch.compiler.is_compiling())
                       and x.shape[0] >= self.CHANNELS_LAST_BATCH)))
        if cl:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.conv2(h)
        h = F.relu(self.conv2_pw(h) if self.design == "separable" else h, inplace=True)
        if self.design == "shuffle":  # C·s² channels at 1/s -> C at s·(H/s) >= H, cropped
            g = F.pixel_shuffle(self.conv3(h), self.stride)[..., :x.shape[-2], :x.shape[-1]]
        else:
            if self.stride != 1:
                h = F.interpolate(h, size=x.shape[-2:], mode="nearest")
            g = self.conv3(h)
        if cl:
            g = g.contiguous()  # the base's layout again (C channels: a small copy)
        scale = self.strength * self.delta
        return x + (g if scale == 1 else scale * g)  # 1·g is g exactly: a pass saved
