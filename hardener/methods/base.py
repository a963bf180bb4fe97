"""The training-method contract, and the registry of methods by name.

A method is a class registered with `@register_method("name", config_cls=...)` (like PEFT's
`register_peft_method`). The trainer (`fit.fit`) knows none by name; it asks the method:

- `trains_base`: what trains. False: only the patches (the base is bit-identical afterwards); True: every base
  weight too (the result is a new base, not a patch; the original base is the teacher).
- `routes`: which BatchNorms the clean and the second input go through: the auxiliary twins ("adv") or the
  base's own ("main"); `auxbn` says whether the method needs twins ("required"), refuses them ("forbidden")
  or takes them as they come ("optional").
- `adversary()`: where the second input of each step comes from, a `choices.Adversary` (the enum `--adversary`
  chooses from, one meaning everywhere): "base" (adversarial examples of the frozen base; made once for the whole
  set when the inputs do not change), "patched" (of the model being trained, every step), "once" (of the original
  model, made once before training, always), "noise" (Gaussian noise).
- `prepare(run)`: once, before the first step (e.g. statistics of the stage-1 adversarial examples).
- `loss(batch)`: the loss as named parts: "loss" (the total that is minimised) and, for the log and the progress
  display, "ce_clean", "ce_adv" and "distill" (0 where absent).
- `converged(epoch_loss)`: stop after this epoch.

A method's own options are a dataclass (`config_cls`); its fields declared with `optspec.option(...)` are user
options (default, range, help and flag stated there once). They are read by name from the trainer's `FitConfig`: its
fields, else its `options` dict (what `steps.training_setup` fills from the run's options); others keep their
defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import InputError
from ..options import optspec, owners
from ..options.choices import Adversary
from . import losses

if TYPE_CHECKING:
    from ..patches import PatchedModel
    from ..training.fit import FitConfig

DEFAULT_METHOD = "patch"  # the method of patches on a frozen base (not a --method choice: the patch kinds are)
ADVERSARIES = tuple(Adversary)
AUXBN = ("required", "forbidden", "optional")


@dataclass
class NoOptions:
    """The options of a method that has none of its own."""


@dataclass
class Batch:
    """One optimiser step's tensors, as the trainer made them for the method's loss."""

    model: "PatchedModel"  # the model being trained (for extra forwards; routes as `routes` says)
    x: torch.Tensor  # the clean input, [0, 1] pixels
    y: torch.Tensor  # labels
    x_adv: torch.Tensor  # the second input (adversarial or noisy)
    out_clean: torch.Tensor  # logits of x on the clean route
    out_adv: torch.Tensor  # logits of x_adv on the adversarial route
    f_clean: dict[str, torch.Tensor]  # features after each patch, clean input
    f_adv: dict[str, torch.Tensor]  # the same, second input
    base_logits: torch.Tensor  # the original base on the clean input (the teacher)
    targets: dict[str, torch.Tensor]  # the base's features on the clean input at each site (patches only)
    teacher_logits: torch.Tensor | None = None  # the robust teacher (`--teacher`) on the clean input, else None


class Method:
    """Base class of training methods: the attributes and hooks the trainer reads (see the module docstring)."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = NoOptions
    trains_base: ClassVar[bool] = False
    dual_bn: ClassVar[bool] = False  # clean inputs through the main BNs, second inputs through the twins
    auxbn: ClassVar[str] = "optional"
    default_lr: ClassVar[float] = 3e-3  # Adam's learning rate when --lr is not given

    def __init__(self, cfg: "FitConfig") -> None:
        self.cfg = cfg
        self.options = options_from(self.config_cls, cfg)

    @property
    def routes(self) -> tuple[str, str]:
        """(route of the clean input, route of the second input)."""
        return ("main", "adv") if self.dual_bn else ("adv", "adv")

    @property
    def default_route(self) -> str:
        """The inference route stored in the checkpoint unless --route says otherwise."""
        return "main" if self.dual_bn else "adv"

    def adversary(self) -> str:
        """Where the second input comes from (`ADVERSARIES`): noise with --noise-sigma, else as --adversary says."""
        return Adversary.NOISE if self.cfg.noise_sigma else Adversary(self.cfg.adversary)

    def prepare(self, run: Any) -> None:
        """Once before training; `run` has `ds`, `cached_adv`, `teacher`, `spec`, `cfg` and `device`."""

    def objective(self, b: Batch) -> dict[str, torch.Tensor]:
        """The method's own loss parts ("loss", "ce_clean", "ce_adv") on one batch."""
        raise NotImplementedError

    def loss(self, b: Batch) -> dict[str, torch.Tensor]:
        """`objective` plus the distillation terms of `FitConfig` (λ: features, μ: logits)."""
        return with_distillation(self.objective(b), b, self.cfg)

    def converged(self, epoch_loss: float) -> bool:
        """Stop after this epoch (its mean loss given)."""
        return False


def with_distillation(parts: dict[str, torch.Tensor], b: Batch, cfg: "FitConfig") -> dict[str, torch.Tensor]:
    """λ · feature distillation (the patched features of both inputs against the base's on the clean input) and
    μ · KL to the base logits on the clean input, added to `parts["loss"]`; `distill` is their weighted sum (what
    they add to the loss)."""
    loss = parts["loss"]
    distill = torch.zeros((), device=b.x.device)
    if b.targets and cfg.lam:
        distill = cfg.lam * (losses.feature_distillation(b.f_clean, b.targets)
                             + losses.feature_distillation(b.f_adv, b.targets))
    if cfg.mu:
        distill = distill + cfg.mu * losses.logit_distillation(b.out_clean, b.base_logits)
    loss = loss + distill
    return {**parts, "loss": loss, "distill": distill}


def options_from(config_cls: type, cfg: Any) -> Any:
    """`config_cls` with the fields `cfg` has (its attributes, then its `options` dict by option name), checked."""
    extra = getattr(cfg, "options", None) or {}
    return optspec.read(config_cls, lambda field, name: getattr(cfg, field, extra.get(name)))


REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str, config_cls: type = NoOptions) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a training method under `name` (a `--method` choice unless it is the default)."""
    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"training method '{name}' must subclass hardener.methods.Method")
        if cls.auxbn not in AUXBN:
            raise TypeError(f"training method '{name}': auxbn must be one of {', '.join(AUXBN)}")
        cls.name, cls.config_cls = name, config_cls
        owners.admit(REGISTRY, name, cls)
        return cls
    return wrap


def names() -> tuple[str, ...]:
    """The registered training methods, in registration order."""
    return tuple(REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as `name` (an `InputError` listing the others if there is none)."""
    if name not in REGISTRY:
        raise InputError(f"unknown training method '{name}' (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


def build(cfg: "FitConfig") -> Method:
    """The method `cfg.method` names, with its options read from `cfg`."""
    method = get(cfg.method)(cfg)
    if method.adversary() not in ADVERSARIES:
        raise TypeError(f"training method '{cfg.method}': adversary() must return one of {', '.join(ADVERSARIES)}")
    return method


def check_options(cfg: "FitConfig") -> None:
    """Every registered method's options, read from `cfg`: a bad value is an error whichever method runs."""
    for cls in REGISTRY.values():
        options_from(cls.config_cls, cfg)
