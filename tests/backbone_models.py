"""Tiny models with the quirks of backbones issue 34 met (no torchvision or timm needed): torchvision GoogLeNet's
auxiliary heads (BatchNorms that run only in training), timm LeViT's `LinearNorm` (BatchNorm1d over a (B·N, C)
reshape of the tokens) and timm Swin's channels-last (N,H,W,C) stages whose permutes are function calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from family_models import _randomise_bns, _randomise_layernorms

# ---------------------------------------------------------------- torchvision GoogLeNet


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, c_in: int, c1: int, c3: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(c_in, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(c_in, c3, 1), BasicConv2d(c3, c3, 3))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.conv = BasicConv2d(c_in, 8, 1)
        self.fc1 = nn.Linear(8 * 4, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, 2)), 1)
        return self.fc2(F.relu(self.fc1(x), inplace=True))


class GoogLeNetLike(nn.Module):
    """torchvision's GoogLeNet layout: `aux1`/`aux2` heads (with BatchNorms) run only in training mode."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, 3, stride=2)
        self.inception3a = Inception(8, 8, 8)
        self.aux1 = InceptionAux(16, num_classes)
        self.inception4a = Inception(16, 8, 16)
        self.aux2 = InceptionAux(24, num_classes)
        self.inception5a = Inception(24, 16, 16)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.inception3a(self.conv1(x))
        aux1 = self.aux1(x) if self.training else None
        x = self.inception4a(F.max_pool2d(x, 2))
        aux2 = self.aux2(x) if self.training else None
        x = self.fc(self.inception5a(x).mean((2, 3)))
        return (x, aux2, aux1) if self.training else x


def googlenet_like(num_classes: int = 10) -> GoogLeNetLike:
    torch.manual_seed(0)
    return _randomise_bns(GoogLeNetLike(num_classes))


# ---------------------------------------------------------------- timm LeViT


class ConvNorm(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm: a Linear on (B, N, C) tokens, then BatchNorm1d over their (B·N, C) reshape."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.bn = nn.BatchNorm1d(d_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, 2 * dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(2 * dim, dim)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


class LeViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = LinearNorm(dim, 3 * dim)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3, c // self.heads).permute(3, 0, 2, 1, 4)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class LeViTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = LeViTAttention(dim)
        self.mlp = LeViTMlp(dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class NormLinear(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(self.bn(x))


class LeViTLike(nn.Module):
    """timm's LeViT layout: a conv stem with BatchNorm2d, token stages of LinearNorm blocks, a NormLinear head."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, dim // 2, 3, 2), nn.Hardswish(), ConvNorm(dim // 2, dim, 3, 2))
        self.stages = nn.Sequential(*[LeViTBlock(dim) for _ in range(4)])
        self.head = NormLinear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.stages(x).mean(1))


def levit_like(num_classes: int = 10) -> LeViTLike:
    torch.manual_seed(0)
    return _randomise_bns(LeViTLike(num_classes))


# ---------------------------------------------------------------- timm Swin (channels-last stages)


class WindowAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (windows, tokens, C)
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj((q @ k.transpose(1, 2) * x.shape[-1] ** -0.5).softmax(-1) @ v)


class SwinBlock(nn.Module):
    """timm's SwinTransformerBlock: channels-last (B,H,W,C) in and out; windows made with function-call permutes."""

    def __init__(self, dim: int, window: int = 2) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop_path2 = nn.Identity()

    def _attn(self, x):
        b, h, w, c = x.shape
        s = self.window
        win = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        out = self.attn(win).view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim) if out_dim != dim else nn.Identity()
        self.blocks = nn.Sequential(*[SwinBlock(out_dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SwinPatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinLike(nn.Module):
    """timm's SwinTransformer layout: patch_embed (NHWC out), layers.k (stages of NHWC blocks), norm, head."""

    def __init__(self, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.patch_embed = SwinPatchEmbed(dim)
        self.layers = nn.Sequential(SwinStage(dim, dim), SwinStage(dim, 2 * dim), SwinStage(2 * dim, 4 * dim))
        self.norm = nn.LayerNorm(4 * dim)
        self.head = nn.Linear(4 * dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.layers(self.patch_embed(x))).mean((1, 2)))


def swin_like(num_classes: int = 10) -> SwinLike:
    torch.manual_seed(0)
    return _randomise_layernorms(SwinLike(num_classes))


# ---------------------------------------------------------------- timm MaxViT (channels-last inside NCHW blocks)


class MaxViTBlock(nn.Module):
    """timm's MaxxVitBlock: an NCHW conv, then window attention and an MLP on a channels-last permute (function
    calls), permuted back: the block's output is a channels-first map, its insides are not."""

    def __init__(self, dim: int, window: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.window = SwinBlock(dim, window)  # reused for its windowed attention and MLP on (B,H,W,C)
        self.drop_path = nn.Identity()

    def forward(self, x):
        x = x + self.conv(x)
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop_path(self.window._attn(self.window.norm1(y)))
        return y.permute(0, 3, 1, 2)


class MaxViTLike(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU())
        self.stages = nn.Sequential(nn.Sequential(MaxViTBlock(dim), MaxViTBlock(dim)),
                                    nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1), MaxViTBlock(2 * dim),
                                                  MaxViTBlock(2 * dim)))
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def maxvit_like(num_classes: int = 10) -> MaxViTLike:
    torch.manual_seed(0)
    return _randomise_layernorms(_randomise_bns(MaxViTLike(num_classes)))
