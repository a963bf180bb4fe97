"""`PatchOptions`: every `harden patch` training option with its default, stated once, in a module that does not
import torch (the command line reads the defaults for `--help`); `hardener.api` re-exports it. The options of patch
kinds and training methods are not fields here: their configs declare them (`optspec`, `kind_options`), and
`PatchOptions` holds their values in `owned` (read as attributes: `opts.rho`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import InputError
from . import optspec, owners


@dataclass
class PatchOptions:
    """Every `harden patch` training option with its default, stated once. Field names are the option names of the
    command line (`--attack` is `attack_name`). The options patch kinds and methods own (`owners.owned()`: `rho`,
    `loss_name` for `--loss`, those of a kind registered from outside, ...) are read as attributes too, from `owned`
    (their defaults where not given)."""

    method: str = "fixer"  # patch kinds and a training method in one list (the spelling of --patch plus --train)
    patch: str | None = None  # patch kinds, KIND:SITE allowed: folded into method and at (`of`)
    train: str | None = None  # the training method: folded into method
    at: str | None = None
    at_regex: str | None = None
    bn: str | None = None
    route: str | None = None
    smooth_grad: str | None = None
    budget: float | str | None = None  # inference multiply-adds relative to the base (cost.fit_budget); None: any
    attack_name: str = "apgd"
    eps: str | float = "8/255"
    norm: str = "Linf"
    steps: int = 10
    alpha: float | None = None
    eps_warmup: float = 0.0
    ema: float = 0.0
    twin_stats: str = "batch"  # how BN twins normalise while training (FitConfig.twin_stats)
    teacher: Any = None  # --loss rslad's robust teacher: a patched checkpoint of the same base, or a module (library)
    select_on: int = 0
    validate: int = 0
    validate_every: int = 1
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
    owned: dict = field(default_factory=dict)  # values of the options kinds and methods own, by option name

    ALIASES = {"attack": "attack_name"}

    def __getattr__(self, name: str) -> Any:
        """An owned option: its value, else its default."""
        spec = None if name.startswith("__") or name == "owned" else owners.find(name)
        if spec is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.__dict__.get("owned", {}).get(name, spec.default)

    @classmethod
    def canonical(cls, name: str) -> str:
        """The option name of a keyword or flag spelling (`attack` -> `attack_name`, `loss` -> `loss_name`)."""
        return cls.ALIASES.get(name) or owners.aliases().get(name, name)

    @classmethod
    def of(cls, values: dict[str, Any], method_given: bool = False) -> "PatchOptions":
        """From option values by name (the command line's), the owned ones parsed and checked into `owned` (an error
        names the flag), `patch` and `train` folded into `method` and `at` (`recipe.split_recipe`; `method_given`:
        the caller set `method` itself); other names are ignored. Errors name flags (`hardener.patch` says them as
        keywords: `options.wording`)."""
        from .recipe import split_recipe

        if values.get("patch") is not None or values.get("train") is not None:
            method, at = split_recipe(values.get("method") or cls.method, values.get("patch"), values.get("train"),
                                      values.get("at"), method_given)
            values = {**values, "method": method, "at": at, "patch": None, "train": None}
        names, owned = {f.name for f in fields(cls)} - {"owned"}, owners.owned()
        return cls(**{k: v for k, v in values.items() if k in names},
                   owned={k: owned[k][1].check(v, optspec.flag(k, owned[k][1])) for k, v in values.items()
                          if k in owned and v is not None})

    def replace(self, **changes: Any) -> "PatchOptions":
        """A copy with `changes` (fields or owned options)."""
        return PatchOptions.of({**{f.name: getattr(self, f.name) for f in fields(self)}, **self.owned, **changes})

    @classmethod
    def build(cls, recipe: str | None, overrides: dict[str, Any]) -> tuple["PatchOptions", Any]:
        """Defaults, then the recipe's options, then `overrides` (aliases allowed); unknown names and values out of
        range are errors. `recipe="auto"` is the CLI's rule: the default preset unless an override shapes the
        recipe (`recipe.RECIPE_OPTIONS`: method, patch, train, at, at_regex, adversary), then the built-in defaults,
        never a mix. The options patch kinds and methods own are checked by their declarations. The errors of the
        rules shared with the command line name flags; `hardener.patch` says them as keywords (`options.wording`)."""
        from .recipe import resolve_preset
        from .validate import OPTION_RULES, check_arg, check_range, parse_level

        owned = owners.owned()
        names = ({f.name for f in fields(cls)} - {"owned"}) | set(owned)
        given = {cls.canonical(k): v for k, v in overrides.items()}
        spelled = {cls.canonical(k): k for k in overrides}  # errors name the keyword as the caller wrote it
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
        if isinstance(values.get("noise_sigma"), str):  # a fraction like "64/255", as the command line takes it
            try:
                values["noise_sigma"] = parse_level(values["noise_sigma"])
            except ValueError as e:
                raise InputError(f"noise_sigma {e}") from None
        types = {f.name: str(f.type) for f in fields(cls)}
        for k, v in values.items():
            if k in owned:  # checked by its declaration, the error naming the Python parameter
                values[k] = owned[k][1].check(v, spelled.get(k, k))
                continue
            check_arg(k, v, types[k])
            if k in OPTION_RULES:
                check_range(k, v)
        check_teacher(values.get("loss_name", "fixer"), values.get("teacher"))
        return cls.of(values, method_given="method" in given), preset


def check_teacher(loss: str, teacher: Any) -> None:
    """A teacher and `--loss rslad` go together: RSLAD's targets are the teacher's soft labels, and no other loss
    uses a teacher. The error names the command line's flags (the library's keywords: `options.wording`)."""
    t, rslad, now = "--teacher", "--loss rslad", f"--loss {loss}"
    if loss == "rslad" and teacher is None:
        raise InputError(f"{rslad} distils from a robust teacher: pass {t} (a patched checkpoint of the same base)")
    if teacher is not None and loss != "rslad":
        raise InputError(f"{t} is used by {rslad} only (robust soft-label distillation), not {now}: use "
                         f"{rslad}, or drop {t}")
