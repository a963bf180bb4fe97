"""`PatchOptions`: every `harden patch` training option with its default, stated once, in a module that does not
import torch (the command line reads the defaults for `--help`); `hardener.api` re-exports it."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import InputError


@dataclass
class PatchOptions:
    """Every `harden patch` training option with its default, stated once. Field names are the option names of the
    command line (`--attack` is `attack_name`, `--loss` is `loss_name`, `--denoise` is `denoise_op`)."""

    method: str = "fixer"
    at: str | None = None
    at_regex: str | None = None
    bn: str | None = None
    route: str | None = None
    denoise_op: str = "nonlocal-gaussian"
    smooth_grad: str | None = None
    act: str = "linear"
    delta: float = 1.0
    rho: float = 4.0
    fixer_rank: int = 0
    width: int = 32
    prefilter_stride: int = 1
    prefilter_design: str = "plain"
    budget: float | str | None = None  # inference multiply-adds relative to the base (cost.fit_budget); None: any
    final_relu: bool = False
    attack_name: str = "apgd"
    eps: str | float = "8/255"
    norm: str = "Linf"
    steps: int = 10
    alpha: float | None = None
    eps_warmup: float = 0.0
    ema: float = 0.0
    loss_name: str = "fixer"
    beta: float = 6.0
    teacher: Any = None  # --loss rslad's robust teacher: a patched checkpoint of the same base, or a module (library)
    teacher_weight: float = 5 / 6  # RSLAD's weight of the adversarial input's KL to the teacher
    select_on: int = 0
    validate: int = 0
    validate_every: int = 1
    phi: float = 0.5
    betas: str | tuple = "1,1,1"
    sigma: float = 0.0
    adversary: str = "base"
    epochs: int = 20
    batch_size: int | str = 128  # or "auto": auto_batch_size
    lr: float | None = None
    lam: float = 1.0
    mu: float = 1.0
    gamma: float = 0.0
    augment: bool = False
    cache: bool = True
    cache_limit: str | int = "2GiB"
    subset: str | float | int | None = None
    holdout: str | float | int = "20%"
    noise_sigma: float = 0.0
    precision: str = "fp32"
    unlabeled: Any = None  # images without labels the frozen base labels: a data spec, "rest" (CLI), or data
    pseudo_threshold: float = 0.0  # keep the pseudo-labelled images the base is at least this confident on
    pseudo_ratio: float = 1.0  # pseudo-labelled images per labelled one in each epoch
    seed: int = 0
    allow_low_accuracy: bool = False  # go on when the base's clean accuracy is near chance (session.check_accuracy)

    ALIASES = {"attack": "attack_name", "loss": "loss_name", "denoise": "denoise_op"}

    @classmethod
    def build(cls, recipe: str | None, overrides: dict[str, Any]) -> tuple["PatchOptions", Any]:
        """Defaults, then the recipe's options, then `overrides` (aliases allowed); unknown names and values out of
        range are errors. `recipe="auto"` is the CLI's rule: the default preset unless an override shapes the
        recipe (method, at, at_regex, adversary), then the built-in defaults, never a mix."""
        from .recipe import resolve_preset
        from .validate import OPTION_RULES, check_arg

        names = {f.name for f in fields(cls)}
        given = {cls.ALIASES.get(k, k): v for k, v in overrides.items()}
        unknown = sorted(k for k in given if k not in names)
        if unknown:
            raise InputError(f"unknown option '{unknown[0]}' (options: {', '.join(sorted(names))})")
        preset, options = resolve_preset(recipe, given, names)
        values = {**options, **given}
        bs = values.get("batch_size")
        if isinstance(bs, str):
            if bs.strip().lower() != "auto":
                raise InputError(f"batch_size must be a positive integer or auto, got {bs!r}")
            values["batch_size"] = "auto"
        types = {f.name: str(f.type) for f in fields(cls)}
        for k, v in values.items():
            check_arg(k, v, types[k])
            rule = OPTION_RULES.get(k)
            if rule and isinstance(v, (int, float)) and not isinstance(v, bool) and not rule[0](v):
                raise InputError(f"{k} {rule[1]}, got {v}")
        check_teacher(values.get("loss_name", "fixer"), values.get("teacher"), library=True)
        return cls(**values), preset


def check_teacher(loss: str, teacher: Any, library: bool = False) -> None:
    """A teacher and `--loss rslad` go together: RSLAD's targets are the teacher's soft labels, and no other loss
    uses a teacher. The error names the library's parameters or the command line's flags."""
    t, rslad, now = ("teacher=", "loss='rslad'", f"loss='{loss}'") if library else ("--teacher", "--loss rslad",
                                                                                  f"--loss {loss}")
    if loss == "rslad" and teacher is None:
        raise InputError(f"{rslad} distils from a robust teacher: pass {t} (a patched checkpoint of the same base)")
    if teacher is not None and loss != "rslad":
        raise InputError(f"{t} is used by {rslad} only (robust soft-label distillation), not {now}: use "
                         f"{rslad}, or drop {t}")
