"""Resumable training: atomic state files beside the output, and SIGINT/SIGTERM as a polite stop.

`<out>.partial` holds the training state (patch weights, optimiser, scheduler, RNG states,
epoch/step, the epoch's permutation and running sums); `<out>.partial.adv.safetensors` the cached
adversarial examples of the frozen base. Both are written atomically and removed once the
patched checkpoint is written. A fingerprint of the run's settings guards `--resume`, and a digest over each
file's content and that fingerprint (`integrity`) guards against edited, damaged or foreign files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import HardenError, InputError
from . import integrity as I
from .checkpoint import atomic_write, write_safetensors, write_torch

STATE_VERSION = 4  # 3: transfer examples come from fixed whole-set batches; 4: an integrity digest
START_OVER = "delete it to start over"


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_start(path: Path, resume: bool, what: str, others: str | None = None) -> None:
    """Refuse to silently discard an interrupted run, or to resume one that is not there. `others`: a glob of the
    states of runs like this one with other settings (their file names hold the settings' fingerprint), named when
    there is nothing to resume under these settings."""
    if resume and not path.exists():
        own = path.name.split("-rank")[0].removesuffix(".partial")  # this run's settings (any rank of it)
        rest = (sorted(p.name for p in path.parent.glob(others) if not p.name.startswith(own))
                if others and path.parent.is_dir() else [])
        hint = (f"; '{path.parent}' holds {len(rest)} interrupted {what}(s) with other settings ({', '.join(rest[:3])}"
                f"{', ...' if len(rest) > 3 else ''}): rerun that command exactly to resume one") if rest else ""
        raise InputError(f"--resume: no saved {what} at '{path}' for these settings (nothing to resume; drop "
                         f"--resume){hint}")
    if not resume and path.exists():
        raise InputError(f"'{path}' holds an interrupted {what}: pass --resume to continue it, "
                         "or delete it to start over")


def write_state(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    """`state` sealed with its digest over its content and the run's fingerprint (`integrity`), atomically."""
    write_torch(path, I.seal({**state, "version": STATE_VERSION, "fingerprint": fingerprint}, fingerprint))


def read_state(path: Path, fingerprint: str) -> dict[str, Any]:
    """A saved state, checked to come from this harden version, from the same settings and to be as written."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged state file comes in many forms
        raise InputError(f"cannot read saved state '{path}' ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         f"; {START_OVER}") from None
    if isinstance(state, dict) and I.DIGEST_KEY in state and state.get("version") != STATE_VERSION:
        raise InputError(f"'{path}' was saved by another harden version; {START_OVER}")
    return I.check(state, path, fingerprint, "saved state", START_OVER,
                   other_run=f"--resume: the settings differ from the interrupted run saved in '{path}' "
                             f"(same model, data and options are needed); {START_OVER}")


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

        tensors = {"adv": adv.contiguous()}
        write_safetensors(self.adv_path, tensors, I.safetensors_metadata(self.fingerprint, tensors))

    def load_adv(self) -> torch.Tensor | None:
        """The base's adversarial examples of this run saved before, checked against their digest; None if absent."""
        if not self.adv_path.exists():
            return None
        tensors = I.read_safetensors(self.adv_path, self.fingerprint, "saved adversarial examples", START_OVER)
        if set(tensors) != {"adv"}:
            raise I.refuse(self.adv_path, "saved adversarial examples", "is not a file harden wrote", START_OVER)
        return tensors["adv"]

    @property
    def spill_path(self) -> Path:
        """Adversarial examples too large for --cache-limit: fp16 on disk, complete once its tag is written."""
        return self.path.with_name(self.path.name + ".adv.npy")

    def spill_done(self) -> bool:
        """Whether the spilled examples are complete (their tag written); a tag or file that does not match (edited,
        another run's) is an InputError."""
        tag = self.spill_path.with_name(self.spill_path.name + ".done")
        if not (self.spill_path.exists() and tag.exists()):
            return False
        I.check_tag(tag, self.spill_path, self.fingerprint, "saved adversarial examples", START_OVER)
        return True

    def mark_spill_done(self) -> None:
        if self.readonly:
            return
        tag = self.spill_path.with_name(self.spill_path.name + ".done")
        text = I.tag_text(self.fingerprint, I.file_digest(self.spill_path, self.fingerprint))
        atomic_write(tag, lambda tmp: Path(tmp).write_text(text))

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

    def __init__(self, path: Path | None, fingerprint: str, resume: bool, interval: float = 20.0,
                 what: str = "evaluation", others: str | None = None, beside: str | None = "a --report") -> None:
        """`path` None: progress is kept in memory only (nothing can be resumed, nothing is written). `what` names
        the run in messages (`harden certify` keeps its rows here too), `others` globs its siblings (`check_start`),
        `beside` says which outputs the state is kept beside (None: only in a state folder given, the library's)."""
        self.path, self.fingerprint, self.interval, self.what = path, fingerprint, interval, what
        self._last = time.time()
        if path is None:
            if resume:
                where = f"--state-dir DIR, HARDEN_CACHE_DIR or beside {beside}" if beside else "--state-dir DIR"
                raise InputError(f"--resume: no {what} state to resume from; {what} state is kept only with {where}")
            self.data: dict[str, Any] = {}
            return
        check_start(path, resume, what, others)
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
                print(f"warning: {e.message}; this {self.what} cannot be resumed", file=sys.stderr)
                self.path = None
            self._last = time.time()


def state_folder(state_dir: str | None, reports: list[str], env: bool = True) -> Path | None:
    """Where `harden eval` and `harden certify` keep resumable state: --state-dir, HARDEN_CACHE_DIR, beside the first
    of `reports`; None (nothing written, nothing resumable) when none is given. Never the working directory by
    default. The library's `state_dir=` is the first of these only (`reports` empty, `env` False)."""
    chosen = state_dir or (os.environ.get("HARDEN_CACHE_DIR") if env else None) or None
    if chosen:
        d = Path(chosen)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"state folder '{d}' cannot be created: {e.strerror}") from None
        if not d.is_dir():
            raise InputError(f"state folder '{d}' is not a folder")
        return d
    if reports:
        parent = Path(reports[0]).parent
        return parent if str(parent) else Path(".")
    return None
