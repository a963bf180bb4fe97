"""A small ResNet-9-like CNN for 28x28 grayscale images (the fixer paper's Table 5-8, narrowed).

Stages (the natural fixer sites): prep -> layer1 -> layer2 -> layer3 -> head.
Takes normalised input; harden wraps the normalisation (see README: --mean/--std).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = conv_block(channels, channels)
        self.b = conv_block(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        super().__init__()
        self.conv = conv_block(c_in, c_out, pool=True)
        self.res = Residual(c_out) if residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.conv(x))


class ResNet9Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.prep = conv_block(in_channels, w)
        self.layer1 = Stage(w, 2 * w, residual=True)  # 14x14
        self.layer2 = Stage(2 * w, 4 * w, residual=False)  # 7x7
        self.layer3 = Stage(4 * w, 6 * w, residual=True)  # 3x3
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(6 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet9_small(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ResNet9Small:
    return ResNet9Small(num_classes=num_classes, in_channels=in_channels, width=width)


class VGGSiLUSmall(nn.Module):
    """A second architecture for the recipes (issue 18): VGG-like, SiLU activations, no residual connections.

    Stages: block1 (28x28) -> block2 (14x14) -> block3 (7x7) -> head; about the example's multiply-adds."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())

        w = width
        self.block1 = block(in_channels, w)
        self.block2 = block(w, 2 * w)
        self.block3 = block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        return self.head(self.block3(x))


def vgg_silu_small(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> VGGSiLUSmall:
    return VGGSiLUSmall(num_classes=num_classes, in_channels=in_channels, width=width)


class Block(nn.Module):
    """A pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViTSmall(nn.Module):
    """A small vision transformer for 28x28 grayscale images (issue 21): 7x7 patches (16 tokens) + a class token,
    4 pre-norm blocks of width 64, torchvision's ViT layout (conv_proj, encoder.layers.*, heads)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dim: int = 64, depth: int = 4, heads: int = 4,
                 patch: int = 7, size: int = 28) -> None:
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.encoder = nn.Sequential(*[Block(dim, heads, 2 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.heads = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv_proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.class_token.expand(len(t), -1, -1), t], 1) + self.pos_embedding
        return self.heads(self.ln(self.encoder(t))[:, 0])


def vit_small(num_classes: int = 10, in_channels: int = 1) -> ViTSmall:
    return ViTSmall(num_classes=num_classes, in_channels=in_channels)
