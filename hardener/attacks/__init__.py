"""Attacks by name: our own PGD, N-FGSM and APGD (`hardener.attacks.apgd`, torchattacks' APGD to the bit, plus an early
stop that evaluation uses), the rest over torchattacks, with its quirks contained.

Every attack works on a model that takes [0, 1] pixels; eps is in pixel units. `run` isolates
the global RNG (APGD, APGD-T, FAB and Square reseed it), keeps stdout clean (targeted modes
print), restores the model's mode and detaches the result. It does not clip to the eps-ball:
evaluation checks the returned examples (a violation is a finding), training projects them.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options.choices import SUITE_VERSIONS  # noqa: F401  (--suite: version -> suite)
from ..options.validate import MAX_COUNT, check_arg
from .apgd import apgd

ALIASES = {"apgd": "apgd-ce"}
# AutoAttack's versions as the reference code sets them (fra31/auto-attack, autoattack.py `set_version`): standard
# (APGD-CE, APGD-T and FAB-T with 9 target classes, Square 5,000 queries, 1 restart each), plus (more restarts and the
# untargeted FAB and APGD-DLR too) and rand (for randomised defences: APGD with EOT over 20 draws per step).
SUITES = {"autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"],
          "autoattack-plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
          "autoattack-rand": ["apgd-ce", "apgd-dlr"]}
SUITE_SETTINGS = {"autoattack-plus": {"apgd-ce": {"restarts": 5}, "apgd-dlr": {"restarts": 5}, "fab": {"restarts": 5}},
                  "autoattack-rand": {"apgd-ce": {"eot": 20}, "apgd-dlr": {"eot": 20}}}
# What evaluation needs to know of an attack, instead of its name: gradient attacks (iterative, on the model's
# gradients: white-box and transfer chains), single-step ones (FGSM: run after the iterative ones, never enough for
# a robustness gate), query attacks (gradient-free: the black-box chain), minimum-norm ones (a sample counts as
# broken only within eps).
KINDS = ("gradient", "single-step", "query", "min-norm")
# The attacks whose spec.stop_early means something (hardener.attacks.apgd: a sample leaves the batch once misclassified).
STOPS_EARLY = ("apgd-ce", "apgd-dlr")


@dataclass(frozen=True)
class AttackInfo:
    name: str
    build: Callable  # (model, AttackSpec) -> callable (x, y) -> adversarial x
    kind: str
    steps: int  # reference budget (AutoAttack / the papers), not torchattacks' cheaper defaults; 0 for queries
    min_classes: int = 2
    train_radius: float = 1.0  # in training, examples may reach train_radius·eps (N-FGSM: noise 2·eps + a step eps)

    @property
    def iterative(self) -> bool:
        return self.kind in ("gradient", "min-norm")


REGISTRY: dict[str, AttackInfo] = {}


def register_attack(name: str, kind: str, steps: int = 100, min_classes: int = 2,
                    train_radius: float = 1.0) -> Callable:
    """Decorator: `@register_attack("my-attack", kind="gradient", steps=50)` on a builder `(model, spec) -> attack`
    makes `--attack my-attack`, `hardener.attacks.get("my-attack")` and evaluation chains use it."""
    if kind not in KINDS:
        raise ValueError(f"attack kind must be one of {', '.join(KINDS)}, got {kind!r}")

    def deco(build: Callable) -> Callable:
        REGISTRY[name] = AttackInfo(name, build, kind, steps, min_classes, train_radius)
        return build
    return deco


def info(name: str) -> AttackInfo:
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise InputError(f"unknown attack '{name}' (choose from {', '.join(attack_names())})")
    return REGISTRY[name]


def parse_eps(text: str | float) -> float:
    """'8/255', '0.1' -> float."""
    s = str(text).strip()
    try:
        v = float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"eps must be a number or a fraction like 8/255, got '{text}'") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"eps must be a finite non-negative number, got '{text}'")
    return v


def check_eps(eps: float, norm: str, n_pixels: int | None = None, what: str = "eps", zero: bool = False) -> float:
    """An attack budget a model of [0, 1] pixels can take: positive (0 only where `zero`: a sweep's clean point), at
    most the whole pixel range: 1 under Linf, sqrt(C*H*W) (all black to all white) under L2 once `n_pixels` is
    known. Larger values are almost always eps in 0-255 units (8 for 8/255), which would run and report a
    meaningless number."""
    if eps < 0 or (eps == 0 and not zero):
        raise InputError(f"{what} {eps:g}: an attack needs a positive budget (the usual Linf one is 8/255)")
    hint = f"did you mean {eps:g}/255 (= {eps / 255:.4g})?" if eps <= 255 else "eps is in [0, 1] pixel units"
    if norm == "Linf" and eps > 1:
        raise InputError(f"{what} {eps:g} (Linf) is more than the whole [0, 1] pixel range, so every image is "
                         f"reachable: {hint}")
    if norm == "L2" and n_pixels and eps > math.sqrt(n_pixels):
        raise InputError(f"{what} {eps:g} (L2) is more than the distance from an all-black to an all-white image of "
                         f"{n_pixels} values ({math.sqrt(n_pixels):.1f}): {hint}")
    return eps


@dataclass
class AttackSpec:
    name: str
    eps: float
    norm: str = "Linf"
    steps: int | None = None
    restarts: int = 1
    queries: int = 5000
    alpha: float | None = None
    seed: int = 0
    n_classes: int = 10
    smooth_grad: float | None = None  # α of the parametric-softplus backward through the base's ReLUs
    eot: int = 1  # expectation over transformation: gradients averaged over this many forward passes (APGD)
    radius: float = 1.0  # examples are projected to radius·eps (1 in evaluation; a training attack's train_radius)
    stop_early: bool = False  # APGD: a sample leaves the batch once misclassified (same verdict; evaluation sets it)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = ALIASES.get(self.name, self.name)
        if self.norm not in ("Linf", "L2"):
            raise InputError(f"norm must be Linf or L2, got '{self.norm}'")
        if self.name == "cw" and self.norm == "L2":
            self.name = "cw-l2"
        meta = info(self.name)
        if self.steps is None or meta.kind == "single-step":
            self.steps = meta.steps
        need = meta.min_classes
        if self.n_classes < need:
            raise InputError(f"{self.name} needs at least {need} classes (its DLR loss uses the top "
                             f"{need - 1 if self.name == 'apgd-dlr' else need} logits); the model has {self.n_classes}")

    @property
    def label(self) -> str:
        return self.name if self.name != "cw-l2" else "cw"

    def record(self) -> dict:
        d = asdict(self)
        d.pop("settings")
        d.update(self.settings)
        kind = info(self.name).kind
        if kind != "query":
            d.pop("queries")
        if kind in ("single-step", "query"):
            d.pop("steps")
        if d["alpha"] is None:
            d.pop("alpha")
        if d["smooth_grad"] is None:
            d.pop("smooth_grad")
        if d["eot"] == 1:
            d.pop("eot")
        if d["radius"] == 1.0:
            d.pop("radius")
        if not (d["stop_early"] and self.name in STOPS_EARLY):
            d.pop("stop_early")
        d["min_norm"] = kind == "min-norm"
        return d


def attack_names() -> list[str]:
    return sorted(set(REGISTRY) - {"cw-l2"} | set(ALIASES) | set(SUITES))


def expand(names: list[str]) -> list[str]:
    """Split comma lists, resolve aliases and suites, keep order, drop repeats."""
    out: list[str] = []
    for n in names:
        for part in [p.strip().lower() for p in n.split(",") if p.strip()]:
            for a in SUITES.get(part, [part]):
                a = ALIASES.get(a, a)
                if a not in REGISTRY and a != "cw":
                    raise InputError(f"unknown attack '{part}' (choose from {', '.join(attack_names())})")
                if a not in out:
                    out.append(a)
    return out


# ---------------------------------------------------------------- builders


def _pgd(model: nn.Module, spec: AttackSpec, loss: str) -> Callable:
    """Linf/L2 PGD with random start, CE or CW-margin loss (our own; torchattacks' PGD is CE only)."""
    eps, steps = spec.eps, int(spec.steps or 1)
    alpha = spec.alpha if spec.alpha is not None else (2.5 * eps / steps if steps > 1 else eps)
    spec.settings.update(alpha=alpha, loss=loss, random_start=True)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(spec.seed)
        if spec.norm == "Linf":
            delta = (torch.rand(x.shape, generator=g, device=x.device) * 2 - 1) * eps
        else:
            d = torch.randn(x.shape, generator=g, device=x.device)
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            r = torch.rand(x.shape[0], generator=g, device=x.device).view(-1, 1, 1, 1)
            delta = d * r * eps
        adv = (x + delta).clamp(0, 1).detach()
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = model(adv)
            if loss == "ce":
                obj = F.cross_entropy(logits, y, reduction="sum")
            else:
                obj = margin_loss(logits, y).sum()
            (grad,) = torch.autograd.grad(obj, adv)
            with torch.no_grad():
                if spec.norm == "Linf":
                    adv = adv + alpha * grad.sign()
                else:
                    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    adv = adv + alpha * grad / gn
                adv = project(x, adv, eps, spec.norm).detach()
        return adv
    return run


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin: max_{j≠y} z_j − z_y (higher = more adversarial)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def _fgsm(model, spec):
    if spec.norm != "Linf":
        raise InputError("fgsm is an Linf attack; use pgd with --norm L2")
    import torchattacks
    return torchattacks.FGSM(model, eps=spec.eps)


def _nfgsm(model: nn.Module, spec: AttackSpec) -> Callable:
    """N-FGSM (de Jorge et al., NeurIPS 2022): uniform noise in [-2·eps, 2·eps], then one signed-gradient step of
    alpha = eps (CE), not clipped back to the eps-ball, so training examples reach 3·eps (spec.radius; in
    evaluation, radius 1 projects them into the ball). One gradient per example: a training adversary."""
    if spec.norm != "Linf":
        raise InputError("n-fgsm is an Linf attack; use pgd with --norm L2")
    eps = spec.eps
    alpha = spec.alpha if spec.alpha is not None else eps
    spec.settings.update(alpha=alpha, noise=2 * eps, loss="ce")

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(spec.seed)
        noise = (torch.rand(x.shape, generator=g, device=x.device) * 2 - 1) * (2 * eps)
        adv = (x + noise).clamp(0, 1).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y, reduction="sum"), adv)
        with torch.no_grad():
            return project(x, adv + alpha * grad.sign(), spec.radius * eps, "Linf").detach()
    return run


def _apgd(loss):
    def build(model, spec):
        spec.settings.update(loss=loss, rho=0.75)
        return lambda x, y: apgd(model, x, y, eps=spec.eps, norm=spec.norm, steps=spec.steps, loss=loss,
                                 restarts=spec.restarts, eot=spec.eot, seed=spec.seed, stop_early=spec.stop_early)
    return build


def _targets(spec) -> int:
    """AutoAttack's number of target classes: 9, or every other class when there are fewer."""
    return min(9, spec.n_classes - 1)


def _apgdt(model, spec):
    import torchattacks
    spec.settings.update(n_target_classes=_targets(spec))
    atk = torchattacks.APGDT(model, norm=spec.norm, eps=spec.eps, steps=spec.steps, n_restarts=spec.restarts,
                             seed=spec.seed, n_classes=spec.n_classes)
    atk.n_target_classes = _targets(spec)  # torchattacks takes every other class (99 on CIFAR-100)
    return atk


def _fab(model, spec):
    import torchattacks
    spec.settings.update(multi_targeted=False)
    return torchattacks.FAB(model, norm=spec.norm, eps=spec.eps, steps=spec.steps, n_restarts=spec.restarts,
                            seed=spec.seed, multi_targeted=False, n_classes=spec.n_classes)


def _fabt(model, spec):
    import torchattacks
    spec.settings.update(n_target_classes=_targets(spec), multi_targeted=True)
    atk = torchattacks.FAB(model, norm=spec.norm, eps=spec.eps, steps=spec.steps, n_restarts=spec.restarts,
                           seed=spec.seed, multi_targeted=True, n_classes=spec.n_classes)
    atk.n_target_classes = _targets(spec)
    return atk


def _square(model, spec):
    import torchattacks
    spec.settings.update(p_init=0.8, loss="margin")
    return torchattacks.Square(model, norm=spec.norm, eps=spec.eps, n_queries=spec.queries,
                               n_restarts=spec.restarts, seed=spec.seed)


def _cw_l2(model, spec):
    import torchattacks
    spec.settings.update(c=1.0, kappa=0.0, lr=0.01)
    return torchattacks.CW(model, c=1.0, kappa=0.0, steps=spec.steps, lr=0.01)


def _deepfool(model, spec):
    import torchattacks
    spec.settings.update(overshoot=0.02)
    return torchattacks.DeepFool(model, steps=spec.steps, overshoot=0.02)


for _name, _build, _kind, _steps, _classes, _radius in (
        ("fgsm", _fgsm, "single-step", 1, 2, 1.0),
        ("n-fgsm", _nfgsm, "single-step", 1, 2, 3.0),
        ("pgd", lambda m, s: _pgd(m, s, "ce"), "gradient", 50, 2, 1.0),
        ("cw", lambda m, s: _pgd(m, s, "cw"), "gradient", 100, 2, 1.0),
        ("cw-l2", _cw_l2, "min-norm", 100, 2, 1.0),
        ("apgd-ce", _apgd("ce"), "gradient", 100, 2, 1.0),
        ("apgd-dlr", _apgd("dlr"), "gradient", 100, 3, 1.0),
        ("apgd-t", _apgdt, "gradient", 100, 4, 1.0),
        ("fab-t", _fabt, "gradient", 100, 2, 1.0),
        ("fab", _fab, "gradient", 100, 2, 1.0),
        ("square", _square, "query", 0, 2, 1.0),
        ("deepfool", _deepfool, "min-norm", 50, 2, 1.0)):
    register_attack(_name, _kind, _steps, _classes, _radius)(_build)


def project(x: torch.Tensor, adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    delta = adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp(0, 1)


def perturbation_norm(x: torch.Tensor, adv: torch.Tensor, norm: str) -> torch.Tensor:
    d = (adv - x).flatten(1)
    return d.abs().max(1).values if norm == "Linf" else d.norm(dim=1)


class Attack:
    """A built attack: call with (x, y) in [0, 1] -> adversarial x, detached (not yet projected)."""

    def __init__(self, model: nn.Module, spec: AttackSpec) -> None:
        self.model = model
        self.spec = spec
        self._impl = info(spec.name).build(model, spec)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        was_training = self.model.training
        self.model.eval()
        try:
            smooth = smooth_relu_gradients(self.model, self.spec.smooth_grad) if self.spec.smooth_grad \
                else contextlib.nullcontext()
            with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []), \
                    contextlib.redirect_stdout(io.StringIO()), smooth:
                torch.manual_seed(self.spec.seed)
                adv = self._impl(x, y)
                if isinstance(adv, tuple):  # deepfool returns (adv, target)
                    adv = adv[0]
        finally:
            self.model.train(was_training)
        adv = adv.detach().to(x.dtype)
        if info(self.spec.name).kind == "min-norm":
            # Minimum-norm attacks: a sample counts as broken only within eps; outside, keep it clean.
            ok = perturbation_norm(x, adv, self.spec.norm) <= self.spec.eps * (1 + 1e-6)
            adv = torch.where(ok.view(-1, 1, 1, 1), adv, x)
        # Returned as the attack made it: callers check the eps-ball (evaluate) or project (fit).
        return adv


class _SmoothReLU(torch.autograd.Function):
    """ReLU forward, parametric-softplus backward: d/dx softplus_α(x) = sigmoid(α·x) (thesis §5.3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(ctx.alpha * x), None


@contextlib.contextmanager
def smooth_relu_gradients(model: nn.Module, alpha: float):
    """While active, every nn.ReLU module of `model` (in-place ones included) keeps ReLU in the
    forward pass and uses softplus_α's derivative in the backward pass. Functional F.relu calls
    are not reached."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    for m in relus:
        m.forward = lambda x, _a=alpha: _SmoothReLU.apply(x, _a)  # instance attribute shadows the method
    try:
        yield
    finally:
        for m in relus:
            del m.forward


def parse_smooth_grad(text: str | None) -> float | None:
    """'softplus:10' -> 10.0 (None when not given)."""
    if not text:
        return None
    kind, _, value = str(text).partition(":")
    try:
        alpha = float(value or 10)
    except ValueError:
        alpha = -1.0
    if kind != "softplus" or not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"--smooth-grad must look like softplus:10 (a positive α), got '{text}'")
    return alpha


def build(model: nn.Module, spec: AttackSpec) -> Attack:
    return Attack(model, spec)


def suite_settings(names: list[str] | tuple[str, ...]) -> dict[str, dict]:
    """Per-attack settings the named suites fix (e.g. 5 restarts in autoattack-plus): {attack: {field: value}}."""
    out: dict[str, dict] = {}
    for n in names:
        for part in [p.strip().lower() for p in str(n).split(",") if p.strip()]:
            for attack, fields in SUITE_SETTINGS.get(part, {}).items():
                out.setdefault(attack, {}).update(fields)
    return out


def parse_attack_list(text: str | list | tuple | None) -> list[str]:
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    return expand([re.sub(r"\s+", "", t) for t in items])


class Bound:
    """An attack usable on its own, torchattacks-style: `atk = hardener.attacks.get("apgd-ce", eps=8/255)`, then
    `x_adv = atk(model, x, y)` with x in [0, 1]; the result is projected onto the threat model (eps ball, [0, 1])."""

    def __init__(self, spec: AttackSpec) -> None:
        self.spec = spec

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return project(x, build(model, self.spec)(x, y), self.spec.eps, self.spec.norm)  # Attack keeps the mode

    def __repr__(self) -> str:
        return f"hardener.attacks.get({self.spec.name!r}, {self.spec.record()})"


def get(name: str, eps: float | str = "8/255", norm: str = "Linf", steps: int | None = None, n_classes: int = 10,
        **settings) -> Bound:
    """One attack by name (`attack_names()`; suites like `autoattack` run through `harden eval`), with the same
    reference budgets as `harden eval` (APGD 100 steps, Square 5,000 queries) unless `steps`/`queries` say
    otherwise. `n_classes` matters for attacks with a minimum (DLR losses need 3 or 4 classes)."""
    import dataclasses


    if not isinstance(name, str):
        raise InputError(f"name must be an attack name (a string), got {name!r}")
    types = {f.name: str(f.type) for f in dataclasses.fields(AttackSpec) if f.name not in ("name", "settings")}
    given = {"eps": eps, "norm": norm, "steps": steps, "n_classes": n_classes, **settings}
    for key, value in given.items():
        if key not in types:
            raise InputError(f"hardener.attacks.get has no argument '{key}' (it takes {', '.join(types)})")
        check_arg(key, value, "float | str" if key == "eps" else types[key])
        if key in ("steps", "restarts", "queries", "eot", "n_classes") and value is not None \
                and not 1 <= value <= MAX_COUNT:
            raise InputError(f"{key} must be an integer in 1..{MAX_COUNT}, got {value}")
    names = expand([name])
    if len(names) != 1:
        raise InputError(f"'{name}' is a suite of {len(names)} attacks ({', '.join(names)}): get them one by one, or "
                         "evaluate the suite with hardener.evaluate")
    return Bound(AttackSpec(name=names[0], eps=parse_eps(str(eps)), norm=norm, steps=steps, n_classes=n_classes,
                            **settings))
