"""SIGTERM as Ctrl-C: one mechanism for the whole of a command, so that every phase stops the same way.

`harden` installs `sigterm_as_interrupt` once per command (`app.run`): a SIGTERM (a scheduler's stop, `kill`, a
container's shutdown) raises `KeyboardInterrupt` wherever the run is, exactly as SIGINT does. Each command then
saves what can be resumed where it catches the interrupt, removes outputs it wrote but did not finish (a run writes
all its outputs or none), releases its `--out` lock and exits 130 with one line. Training alone replaces both
handlers for its duration with a flag (`resume.StopFlag`), so that it stops between steps with consistent state.
No torch here: the command line installs it before anything heavy is imported.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM stop a run like Ctrl-C does (KeyboardInterrupt), so that state can be saved; SIGINT too where the
    process inherited it ignored (a job started in the background by a non-interactive shell): training's stop flag
    always took it, so every phase does."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def outputs_or_none(stopped: Callable[[], str]) -> Iterator[list]:
    """The block of a command that writes its outputs: each path appended to the yielded list once written is
    removed again if the block is interrupted (SIGINT, or SIGTERM under `sigterm_as_interrupt`), so a run leaves
    all its outputs or none. `stopped()` then saves what can be resumed and says so: the one line of the
    `Interrupted` (exit 130) raised in place of the KeyboardInterrupt."""
    from ..errors import Interrupted

    written: list = []
    try:
        yield written
    except KeyboardInterrupt:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise Interrupted(stopped()) from None


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held while the block runs, then raised as KeyboardInterrupt: for imports at start-up, where
    an interrupt inside a module's import leaves it half initialised (numpy then recurses at its next use)."""
    got: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, _frame: got.append(signum))
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if got:
        raise KeyboardInterrupt
