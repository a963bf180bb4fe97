"""The base classifier as harden sees it: [0, 1] pixels in, logits out.

`Classifier` wraps the user's network with the input normalisation and the logits extraction,
so every attack works in pixel space with eps in pixel units. The user's network sits under
`.net` and keeps its own parameter names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..options.validate import regular_input


@dataclass
class InputSpec:
    shape: list[int] | None = None  # C,H,W
    mean: list[float] | None = None
    std: list[float] | None = None
    classes: list[str] | None = None
    num_classes: int | None = None
    logits: str | None = None  # key or index into a tuple/dict output
    preprocessing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None or text == "":
        return None
    try:
        return [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got '{text}'") from None


def hf_normalisation(path: str | None, mean: str | None, std: str | None) -> tuple[str | None, str | None]:
    """--mean/--std from a Hugging Face `preprocessor_config.json` (`image_mean`, `image_std`; harden feeds [0, 1]
    pixels, so it must rescale by 1/255 as HF processors do by default). None: the user's --mean/--std as given."""
    if not path:
        return mean, std
    import json
    import math


    if mean or std:
        raise InputError("--preprocessor sets --mean/--std: give one or the other")
    p = regular_input(path, "--preprocessor")
    if p.stat().st_size > 1 << 20:
        raise InputError(f"--preprocessor '{path}' is over 1 MiB: not a preprocessor_config.json")
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--preprocessor '{path}' is not a JSON file ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"--preprocessor '{path}' must hold a JSON object (a Hugging Face preprocessor_config.json)")
    scale = cfg.get("rescale_factor", 1 / 255)
    if cfg.get("do_rescale", True) is not True or not isinstance(scale, (int, float)) or \
            not math.isclose(scale, 1 / 255, rel_tol=1e-4):
        raise InputError(f"--preprocessor '{path}' does not rescale pixels by 1/255 (do_rescale, rescale_factor): "
                         "harden feeds [0, 1] pixels; pass --mean/--std in those units yourself")
    if cfg.get("do_normalize", True) is not True:
        return None, None

    def values(key: str) -> str:
        v = cfg.get(key)
        v = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not (isinstance(v, list) and 0 < len(v) <= 64 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise InputError(f"--preprocessor '{path}': '{key}' must be a number or a list of numbers")
        return ",".join(repr(float(x)) for x in v)
    return values("image_mean"), values("image_std")


def parse_shape(text: str | None) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        shape = [int(v) for v in str(text).replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--input-shape must be C,H,W (for example 3,32,32), got '{text}'")
    return shape


def extract_logits(out: Any, key: str | None) -> torch.Tensor:
    """Pick the logits tensor out of a model's output (tensor, tuple, dict or object with .logits)."""
    if key is not None and key != "":
        try:
            if isinstance(out, dict):
                return out[key]
            if isinstance(out, (tuple, list)):
                return out[int(key)]
            return getattr(out, key)
        except (KeyError, IndexError, ValueError, AttributeError):
            raise InputError(f"--logits {key}: the model's output ({type(out).__name__}) has no such entry") from None
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        flat = [(i, t) for i, t in enumerate(out) if isinstance(t, torch.Tensor) and t.ndim == 2]
        if len(flat) > 1 and len({t.shape[1] for _, t in flat}) > 1:
            # (features, logits) or (logits, features): taking element 0 would silently make a 512-class model
            shapes = ", ".join(f"[{i}] {tuple(t.shape)}" for i, t in flat)
            raise InputError(f"the model returns a {type(out).__name__} with several (batch, N) tensors ({shapes}): "
                             "say which holds the logits with --logits INDEX")
        return out[0]
    raise InputError(f"cannot find logits in the model's output ({type(out).__name__}); pass --logits KEY|INDEX")


def normalisation(name: str, values: list[float] | None, channels: int | None = None) -> torch.Tensor | None:
    """--mean or --std as a (1, C, 1, 1) buffer, checked: one value or one per channel, finite, a std positive."""
    if values is None:
        return None
    if channels is not None and len(values) not in (1, channels):
        raise InputError(f"--{name} has {len(values)} values but the input has {channels} channels")
    if name == "std" and min(values) <= 0:
        raise InputError("--std values must be positive")
    t = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
    # finite in float32, and a std whose inverse is too (--std inf zeroes every input: no gradient,
    # robust = clean; 1e-45 makes every input inf)
    if not bool(torch.isfinite(t).all()) or name == "std" and not bool(torch.isfinite(1 / t).all()):
        raise InputError(f"--{name} values must be finite{' and positive' if name == 'std' else ''} "
                         f"(as 32-bit floats), got {','.join(f'{v:g}' for v in values)}")
    return t


class Classifier(nn.Module):
    """x in [0, 1] -> normalise -> net -> logits."""

    def __init__(self, net: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        channels = spec.shape[0] if spec.shape else None
        for name, values in (("mean", spec.mean), ("std", spec.std)):
            self.register_buffer(name, normalisation(name, values, channels), persistent=False)
        self.trainable = False
        self.net.eval()

    def train(self, mode: bool = True) -> "Classifier":
        # The base is frozen: it stays in eval mode whatever a library asks -- unless a full fine-tuning
        # method has made it trainable.
        mode = bool(mode) and self.trainable
        self.training = mode
        self.net.train(mode)
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> what `net` takes."""
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return extract_logits(self.net(self.normalise(x)), self.spec.logits).float()
