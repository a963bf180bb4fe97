"""Typed evaluation results: an attack's row, a threat model's chain, a model's and a whole evaluation's results, the
per-sample correctness masks as fields beside the figures. `evaluation.threats` makes them; `report.build` alone makes the
report's JSON of them (`public`: every field but the masks, and an optional one only where it is set).

Saved results (the base cache's `base.pt`, the resumable evaluation state) keep the dict format of before, the masks
under private keys (`"_after"` of a row, `"_masks"` of a model): `to_state()` / `from_state()` convert at those two
places alone, so files written by earlier versions load as they did (`torch.load(weights_only=True)`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module imports nothing at run time
    from torch import Tensor

MASK = {"mask": True}  # a per-sample tensor: in the saved state, never in a report
OPTIONAL = {"optional": True}  # in a report only where it is set (not None)
THREATS = ("whitebox", "adaptive", "surrogate", "transfer", "blackbox")  # the threat models, in the reports' order


def public(obj: Any) -> dict:
    """A result's fields as a report shows them, in their order: masks left out, optional fields only where set."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if not f.metadata.get("mask")
            and not (f.metadata.get("optional") and getattr(obj, f.name) is None)}


def equal(a: Any, b: Any) -> bool:
    """Equal values, tensors compared whole (a mask's `==` is elementwise), dicts in the same key order (the order a
    report shows): what `==` of two results means."""
    if type(a) is not type(b):
        return False
    if hasattr(a, "equal") and hasattr(a, "dtype"):  # a tensor (this module does not import torch)
        return a.dtype == b.dtype and a.shape == b.shape and bool(a.equal(b))
    if is_dataclass(a):
        return all(equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(equal, a, b))
    return a == b


class Result:
    """`==` by value, masks included (`equal`)."""

    def __eq__(self, other: object) -> bool:
        return equal(self, other) if type(other) is type(self) else NotImplemented

    __hash__ = None  # mutable


@dataclass(eq=False)
class AttackRow(Result):
    """One attack of a chain: what it was given, what it broke, how fast."""

    attack: str  # the spec's label
    settings: dict  # `AttackSpec.record()`
    attacked: int  # samples still unbroken when it started
    broken: int
    robust_after: dict  # `evaluation.threats.acc` of the chain's mask after it
    seconds: float
    images_per_s: float | None
    after: Tensor | None = field(default=None, metadata=MASK)  # per-sample: unbroken after it (and those before it)

    def to_state(self) -> dict:
        return {**public(self), **({"_after": self.after} if self.after is not None else {})}

    @classmethod
    def from_state(cls, d: dict) -> AttackRow:
        return cls(**{f.name: d[f.name] for f in fields(cls) if not f.metadata.get("mask")}, after=d.get("_after"))


@dataclass(eq=False)
class ThreatResult(Result):
    """One threat model's chain of attacks on one model."""

    attacks: list[AttackRow]
    robust: dict  # `evaluation.threats.acc` of `mask`
    eps_violations: int  # returned examples outside the eps-ball or [0, 1] (projected before scoring)
    mask: Tensor | None = field(default=None, metadata=MASK)  # per-sample: unbroken by every attack of the chain

    def to_state(self) -> dict:
        """Today's dict (the mask is kept among its model's `"_masks"`)."""
        return {"attacks": [r.to_state() for r in self.attacks], "robust": self.robust,
                "eps_violations": self.eps_violations}

    @classmethod
    def from_state(cls, d: dict, mask: Tensor | None) -> ThreatResult:
        return cls([AttackRow.from_state(r) for r in d["attacks"]], d["robust"], d["eps_violations"], mask)


@dataclass(eq=False)
class ModelResult(Result):
    """Every threat model on one model (the base, or the patched model), with the per-sample worst case."""

    clean: dict
    threats: dict[str, ThreatResult]
    worst_case: dict
    broken_by: dict[str, int]  # `threat/attack` (or clean_error, robust) -> samples it was first to break
    per_sample_broken_by: list[str | None]
    per_class: list[dict]
    clean_mask: Tensor = field(metadata=MASK)  # per-sample: correct without attack
    worst_mask: Tensor = field(metadata=MASK)  # per-sample: unbroken by every threat model that ran
    threats_skipped: dict[str, str] | None = field(default=None, metadata=OPTIONAL)  # threat -> why not run
    worst_whitebox: dict | None = field(default=None, metadata=OPTIONAL)  # the attacks that know the model
    worst_whitebox_mask: Tensor | None = field(default=None, metadata=MASK)
    correct_by_base: dict | None = field(default=None, metadata=OPTIONAL)  # figures on the base's correct samples

    def masks(self) -> dict[str, Tensor]:
        """Every mask by its saved name, in the saved order: clean, worst, each threat's, worst_whitebox."""
        out = {"clean": self.clean_mask, "worst": self.worst_mask, **{t: th.mask for t, th in self.threats.items()}}
        if self.worst_whitebox_mask is not None:
            out["worst_whitebox"] = self.worst_whitebox_mask
        return out

    def to_state(self) -> dict:
        d = {"clean": self.clean, "threats": {t: th.to_state() for t, th in self.threats.items()},
             "worst_case": self.worst_case, "broken_by": self.broken_by,
             "per_sample_broken_by": self.per_sample_broken_by, "per_class": self.per_class, "_masks": self.masks()}
        for k in ("threats_skipped", "worst_whitebox", "correct_by_base"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_state(cls, d: dict) -> ModelResult:
        m = d["_masks"]
        return cls(d["clean"], {t: ThreatResult.from_state(th, m.get(t)) for t, th in d["threats"].items()},
                   d["worst_case"], d["broken_by"], d["per_sample_broken_by"], d["per_class"], m["clean"], m["worst"],
                   d.get("threats_skipped"), d.get("worst_whitebox"), m.get("worst_whitebox"), d.get("correct_by_base"))


@dataclass(eq=False)
class EvalResult(Result):
    """A whole evaluation: the models' results, the sanity checks, the eps sweeps and what the run used."""

    models: dict[str, ModelResult]  # "base", and "patched" when the model has patches
    checks: list[dict]
    eps_sweep: list[dict] | None
    eps_sweep_base: list[dict] | None
    n: int
    n_classes: int
    base_cache: dict | None  # `BaseCache.record`
    out_of_memory: list[dict]  # the batch halvings (`evaluation.threats.halve_on_oom`)

    def to_state(self) -> dict:
        return {**public(self), "models": {k: m.to_state() for k, m in self.models.items()}}

    @classmethod
    def from_state(cls, d: dict) -> EvalResult:
        return cls(**{**{f.name: d[f.name] for f in fields(cls)},
                      "models": {k: ModelResult.from_state(m) for k, m in d["models"].items()}})
