"""Resumable training: atomic state files beside the output, and SIGINT/SIGTERM as a polite stop.

`<out>.partial` holds the training state (patch weights, optimiser, scheduler, RNG states,
epoch/step, the epoch's permutation and running sums); `<out>.partial.adv.safetensors` the cached
adversarial examples of the frozen base. Both are written atomically and removed once the
patched checkpoint is written. A fingerprint of the run's settings guards `--resume`.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import json
import sys
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint import atomic_write, write_torch
from .errors import HardenError, InputError

STATE_VERSION = 3  # 3: transfer examples come from fixed whole-set batches


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_start(path: Path, resume: bool, what: str) -> None:
    """Refuse to silently discard an interrupted run, or to resume one that is not there."""
    if resume and not path.exists():
        raise InputError(f"--resume: no saved {what} at '{path}' (nothing to resume; drop --resume)")
    if not resume and path.exists():
        raise InputError(f"'{path}' holds an interrupted {what}: pass --resume to continue it, "
                         "or delete it to start over")


def write_state(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    state = {**state, "version": STATE_VERSION, "fingerprint": fingerprint}
    write_torch(path, state)


def read_state(path: Path, fingerprint: str) -> dict[str, Any]:
    """A saved state, checked to come from this harden version and from the same settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged state file comes in many forms
        raise InputError(f"cannot read saved state '{path}' ({str(e).splitlines()[0]}); "
                         "delete it to start over") from None
    if state.get("version") != STATE_VERSION:
        raise InputError(f"'{path}' was saved by another harden version; delete it to start over")
    if state.get("fingerprint") != fingerprint:
        raise InputError(f"--resume: the settings differ from the interrupted run saved in '{path}' "
                         "(same model, data and options are needed); delete it to start over")
    return state


@dataclass
class Saver:
    path: Path  # <out>.partial
    fingerprint: str
    resume: bool = False
    every_steps: int = 0  # also save every N steps (0: at the end of each epoch only)
    readonly: bool = False  # another process of a distributed run: reads the state to resume, never writes

    @property
    def adv_path(self) -> Path:
        return self.path.with_name(self.path.name + ".adv.safetensors")

    def check_start(self) -> None:
        check_start(self.path, self.resume, "training run")

    def save(self, state: dict[str, Any]) -> None:
        if self.readonly:
            return
        write_state(self.path, self.fingerprint, state)

    def load(self) -> dict[str, Any]:
        return read_state(self.path, self.fingerprint)

    def save_adv(self, adv: torch.Tensor) -> None:
        if self.readonly:
            return
        from .checkpoint import write_safetensors

        write_safetensors(self.adv_path, {"adv": adv.contiguous()}, {"fingerprint": self.fingerprint})

    def load_adv(self) -> torch.Tensor | None:
        from safetensors import safe_open

        if not self.adv_path.exists():
            return None
        try:
            with safe_open(str(self.adv_path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                    return None
                return f.get_tensor("adv")
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed
            return None

    @property
    def spill_path(self) -> Path:
        """Adversarial examples too large for --cache-limit: fp16 on disk, complete once its tag is written."""
        return self.path.with_name(self.path.name + ".adv.npy")

    def spill_done(self) -> bool:
        tag = self.spill_path.with_name(self.spill_path.name + ".done")
        return self.spill_path.exists() and tag.exists() and tag.read_text() == self.fingerprint

    def mark_spill_done(self) -> None:
        if self.readonly:
            return
        tag = self.spill_path.with_name(self.spill_path.name + ".done")
        atomic_write(tag, lambda tmp: Path(tmp).write_text(self.fingerprint))

    def clear(self) -> None:
        if self.readonly:
            return
        self.path.unlink(missing_ok=True)
        self.adv_path.unlink(missing_ok=True)
        self.spill_path.unlink(missing_ok=True)
        self.spill_path.with_name(self.spill_path.name + ".done").unlink(missing_ok=True)


class StopFlag:
    """Set by SIGINT/SIGTERM while installed; the training loop saves and stops at the next step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        def handler(signum, _frame):
            self.signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            yield self
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)


class EvalStore:
    """Progress of a `harden eval` run, per attack and batch, so an interrupted run can resume.

    Saved atomically at most every `interval` seconds and at the end of each attack; removed once
    the report is written. Keys name model, threat model and attack position in the chain.
    """

    def __init__(self, path: Path | None, fingerprint: str, resume: bool, interval: float = 20.0) -> None:
        """`path` None: progress is kept in memory only (nothing can be resumed, nothing is written)."""
        self.path, self.fingerprint, self.interval = path, fingerprint, interval
        self._last = time.time()
        if path is None:
            if resume:
                raise InputError("--resume: no evaluation state to resume from; evaluation state is kept only "
                                 "with --state-dir DIR, HARDEN_CACHE_DIR or beside a --report")
            self.data: dict[str, Any] = {}
            return
        check_start(path, resume, "evaluation")
        self.data = read_state(path, fingerprint)["data"] if resume else {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict, force: bool = False) -> None:
        self.data[key] = value
        if force or time.time() - self._last >= self.interval:
            self.flush()

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def flush(self) -> None:
        if self.data and self.path is not None:
            try:
                write_state(self.path, self.fingerprint, {"data": self.data})
            except HardenError as e:  # state is a convenience: the evaluation goes on without it
                print(f"warning: {e.message}; this evaluation cannot be resumed", file=sys.stderr)
                self.path = None
            self._last = time.time()

