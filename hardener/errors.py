"""harden's errors: one clear message (with a hint where one helps) and a stable exit code.

Library code raises these and never imports click; the command line prints `Error: <message>` and exits with
`exit_code`: 1 a --fail-under threshold missed, 2 bad input, 3 a failed run, 130 interrupted.
"""
from __future__ import annotations

import sys


class HardenError(Exception):
    """Base of every error harden reports as one line."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def format_message(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message

    def show(self, file=None) -> None:
        print(f"Error: {self.format_message()}", file=file or sys.stderr)

    def __str__(self) -> str:
        return self.format_message()


class InputError(HardenError):
    """Bad input from the user (file, option, data): exit code 2."""

    exit_code = 2


class UsageError(InputError):
    """A missing argument or option (exit code 2): the command line shows its usage lines first."""


class RunError(HardenError):
    """A run that failed (NaN loss, out of memory, disk full): exit code 3."""

    exit_code = 3


class ThresholdError(HardenError):
    """A --fail-under threshold was missed: exit code 1."""

    exit_code = 1


class Interrupted(HardenError):
    """Stopped by SIGINT/SIGTERM after saving state: exit code 130."""

    exit_code = 130
