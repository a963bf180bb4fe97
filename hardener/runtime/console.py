"""What the commands show: results on stdout (`out`), everything else on stderr (`err`, the rich `err_console`,
progress bars or lines). No click: the command line and the library's commands share it."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from rich.console import Console

from ..errors import InputError
from .clock import fmt_seconds

err_console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)


def silent(_text: str) -> None:
    """Says nothing: a run's `say`/`warn` when its caller wants no output."""


def out(text: str) -> None:
    """A line of the command's result on stdout."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def err(text: str) -> None:
    """A plain line on stderr (no markup)."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def data_lines(ds) -> list[str]:
    """Which class index is which and what preprocessing was done, a line each."""
    classes = ([f"{ds.source}: {len(ds)} images; classes " + ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes))]
               if ds.classes else [])
    return classes + [f"{ds.source}: {note}" for note in ds.notes]


def announce(ds, quiet: bool) -> None:
    """Say on stderr which class index is which and what preprocessing was done."""
    if quiet:
        return
    for line in data_lines(ds):
        err_console.print(line)


class ProgressView:
    """Progress on stderr, nothing with --quiet. On a terminal: a rich bar per phase with one ETA (the run's own, which
    counts validation, when it gives one; else the bar's rate). Off a terminal (CI logs, pipes): plain lines every
    HARDEN_PROGRESS_SECONDS (default 10) and at the start and end of each phase, and a heartbeat line whenever nothing was
    printed for that long (a long batch, the sanity checks, a certification), so a log never goes quiet for longer.
    A callback whose `info` has "line" prints that line as is (the per-epoch validation line)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.lines = not (err_console.is_terminal or err_console.is_jupyter)  # a bar in a terminal or a notebook
        try:
            self.every = float(os.environ.get("HARDEN_PROGRESS_SECONDS", "10") or 10)
        except ValueError:
            self.every = -1.0
        if not self.every > 0:
            raise InputError(f"HARDEN_PROGRESS_SECONDS must be a positive number of seconds, got "
                             f"'{os.environ.get('HARDEN_PROGRESS_SECONDS')}'")
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._last = time.time()  # the last line printed
        self._mark = time.time()  # the last callback of any phase: where a new phase starts
        self._now: tuple[str, int, int] | None = None  # the phase last reported, for the heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "ProgressView":
        self._last = self._mark = time.time()  # made before a run's planning, the view's clock starts here
        if self.quiet:
            return self
        if self.lines:
            self._beat = threading.Thread(target=self._heartbeat, name="harden-heartbeat", daemon=True)
            self._beat.start()
            return self
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.text import Text

        class Eta(ProgressColumn):  # one ETA: the run's own where it gives one (`eta` in info), else the rate's
            def render(self, task) -> Text:
                left = task.time_remaining
                return Text("eta " + (task.fields.get("eta") or (fmt_seconds(left) if left is not None else "?")))

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), Eta(),
                                  TextColumn("{task.fields[info]}"), console=err_console, transient=False)
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if self.quiet:
            return
        line = info.get("line")
        text = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                        if k not in ("line", "eta"))
        if self.lines:
            with self._lock:
                self._line(phase, done, total, text, info, line)
            return
        if line:
            self._progress.console.print(line, highlight=False, markup=False)
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="", eta=None)
        self._progress.update(self._tasks[phase], completed=done, total=total, info=text, eta=info.get("eta"))

    def _line(self, phase: str, done: int, total: int, text: str, info: dict, line: str | None) -> None:
        now = time.time()
        new = phase not in self._started  # a phase's first callback is a line: where it starts
        start = self._started.setdefault(phase, self._mark)
        self._mark = now
        self._now = (phase, done, total)
        if line:
            self._last = now
            err(line)
            return
        if now - self._last < self.every and done < total and not new:
            return
        self._last = now
        elapsed = now - start
        eta = info.get("eta") or (fmt_seconds(elapsed / done * (total - done)) if done else "?")
        err(f"{phase} {done}/{total} ({done / max(1, total):.0%}) elapsed {fmt_seconds(elapsed)} eta {eta}"
            + (f" {text}" if text else ""))

    def _heartbeat(self) -> None:
        """Off a terminal: a line whenever none was printed for `every` seconds, naming the phase under way."""
        while not self._stop.wait(min(1.0, self.every / 4)):
            with self._lock:
                now = time.time()
                if now - self._last < self.every:
                    continue
                self._last = now
                if self._now is None:
                    err(f"working: elapsed {fmt_seconds(now - self._mark)} (heartbeat)")
                    continue
                phase, done, total = self._now
                if done < total:
                    err(f"{phase} {done}/{total}: still running, {fmt_seconds(now - self._started[phase])} in this "
                        "phase (heartbeat)")
                else:
                    err(f"still running after {phase}: {fmt_seconds(now - self._mark)} since (heartbeat)")


def library_voice(progress=True, words=None):
    """How a library run (`hardener.patch`, `.evaluate`, `.certify`) speaks: `(say, warn, progress)`. Progress on
    stderr (`True`), none (`False`/None) or the caller's callable; the plan and the notes to the "hardener" logger,
    and on stderr too with `progress=True`; warnings as `UserWarning`s, pointed at the library call's caller. `words`
    (text -> text) puts the notes and warnings in the library's words (`wording.python_words`: keywords, not
    flags)."""
    import warnings

    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise InputError(f"progress must be True, False or a callable (phase, done, total, info), got "
                         f"{type(progress).__name__} {progress!r}")
    shown = progress is True
    log = logging.getLogger("hardener")

    def say(text: str) -> None:
        text = words(text) if words else text
        log.info(text)
        if shown:
            err(text)

    def warn(text: str) -> None:
        text = words(text) if words else text
        warnings.warn(text, UserWarning, stacklevel=5)  # the caller of hardener.patch (warn, plan, patch_run, patch)

    view = ProgressView(quiet=False) if shown else (None if progress is False else progress)
    return say, warn, view
