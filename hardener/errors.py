"""Errors that the command line turns into one clear line and a stable exit code."""
from __future__ import annotations

import click


class InputError(click.ClickException):
    """Bad input from the user (file, option, data): exit code 2."""

    exit_code = 2


class RunError(click.ClickException):
    """A run that failed (NaN loss, out of memory, disk full): exit code 3."""

    exit_code = 3


class ThresholdError(click.ClickException):
    """A --fail-under threshold was missed: exit code 1."""

    exit_code = 1
