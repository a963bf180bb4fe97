"""The training record: what a patch run trained, as the checkpoint's manifest stores it under "training"."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

OPTIONAL = ("teacher", "validation")  # in the record only where set (a distilled run; a run that validated)


@dataclass
class TrainingRecord:
    """No wall times: equal runs write equal files. `to_dict()` is the manifest's JSON object (what earlier versions
    wrote, and what `hardener.load` reads back as `model.manifest.training`); `record["config"]` reads a field as
    that dict has it."""

    config: dict  # the trainer's configuration (method, loss, eps, epochs, ... and the methods' own options)
    attack: dict  # the training attack (`AttackSpec.record`)
    epochs: list  # one entry per epoch: losses, accuracies, validation figures
    seed: int
    data: dict  # source, fingerprint, size and subset of the training data
    torch: str
    torchattacks: str
    preset: dict | None = None  # the recipe the options came from, and which of its options the caller overrode
    threat_model: str | None = None  # what the patch was trained to withstand (transfer or white-box)
    split: dict | None = None  # the held-out split (sizes, seed, the unlabelled pool)
    teacher: dict | None = None  # a distilled run's teacher: file name and sha256
    validation: dict | None = None  # the per-epoch validation that chose the epoch kept

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name in OPTIONAL and getattr(self, f.name) is None)}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]
