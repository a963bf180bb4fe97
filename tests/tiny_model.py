"""Tiny models for the tests (built by the tests, no downloads)."""
from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 4, out: str = "tensor") -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        )
        self.block = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))
        self.out = out

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        h = self.block(h) + h
        logits = self.head(h)
        if self.out == "tuple":
            return (logits, h)
        if self.out == "dict":
            return {"features": h, "scores": logits}
        return logits


def tiny(num_classes: int = 3, in_channels: int = 1, width: int = 4) -> Tiny:
    return Tiny(num_classes, in_channels, width)


def tiny_tuple(num_classes: int = 3) -> Tiny:
    return Tiny(num_classes, out="tuple")


def tiny_dict(num_classes: int = 3) -> Tiny:
    return Tiny(num_classes, out="dict")


class Shared(nn.Module):
    """One ReLU module called twice (like torchvision's ResNet): not a valid site."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        h = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def shared(num_classes: int = 3) -> Shared:
    return Shared(num_classes)


class Rounding(nn.Module):
    """Rounds its input before a linear score: zero input-gradients everywhere (gradient masking)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        s = torch.round(x).flatten(1).sum(1) * self.scale  # class 1 once half the pixels round up
        return torch.stack([7.5 - s, s - 7.5], dim=1)


def rounding() -> Rounding:
    return Rounding()


class Fragile(nn.Module):
    """Linear 2-class model; the test data sits within 0.01 of its boundary: any attack breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.cat([-torch.ones(1, 16), torch.ones(1, 16)]) / 16)
            self.fc.bias.copy_(torch.tensor([0.25, -0.25]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def fragile() -> Fragile:
    return Fragile()
