"""What the commands show: results on stdout (`out`), everything else on stderr (`err`, the rich `err_console`,
progress bars or lines). No click: the command line and the library's commands share it."""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console

from .clock import fmt_seconds
from .errors import InputError

err_console = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)


def out(text: str) -> None:
    """A line of the command's result on stdout."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def err(text: str) -> None:
    """A plain line on stderr (no markup)."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def announce(ds, quiet: bool) -> None:
    """Say on stderr which class index is which and what preprocessing was done."""
    if quiet:
        return
    if ds.classes:
        err_console.print(f"{ds.source}: {len(ds)} images; classes "
                          + ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes)))
    for note in ds.notes:
        err_console.print(f"{ds.source}: {note}")


class ProgressView:
    """Progress on stderr: a rich bar on a terminal; plain lines every HARDEN_PROGRESS_SECONDS (default 10) and at
    the end of each phase otherwise (CI logs, pipes); nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.lines = not err_console.is_terminal
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
        self._last = 0.0
        self._mark = time.time()  # the last callback of any phase: where a new phase starts

    def __enter__(self) -> "ProgressView":
        if not self.quiet and not self.lines:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=err_console, transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if self.quiet:
            return
        text = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        if self.lines:
            self._line(phase, done, total, text, info)
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, info="")
        self._progress.update(self._tasks[phase], completed=done, total=total, info=text)

    def _line(self, phase: str, done: int, total: int, text: str, info: dict) -> None:
        now = time.time()
        start = self._started.setdefault(phase, self._mark)
        self._mark = now
        if now - self._last < self.every and done < total:
            return
        self._last = now
        elapsed = now - start
        eta = info.get("eta") or (fmt_seconds(elapsed / done * (total - done)) if done else "?")
        rest = " ".join(t for t in text.split() if not t.startswith("eta="))
        err(f"{phase} {done}/{total} ({done / max(1, total):.0%}) elapsed {fmt_seconds(elapsed)} eta {eta}"
            + (f" {rest}" if rest else ""))
