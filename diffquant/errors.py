"""Project errors: expected failures that the CLI prints as one line, never a traceback.

Every message names the thing that is wrong and the fix, in the form `<what> — <fix>`.
"""

from __future__ import annotations

import click


class DiffquantError(click.ClickException):
    """An expected failure with a one-line message; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None) -> None:
        message = f"{what} — {fix}" if fix else what
        super().__init__(message)


class ConfigError(DiffquantError):
    """A preset, recipe or command-line value that is not allowed."""


class ArtifactError(DiffquantError):
    """A calibration artifact or checkpoint that is missing, corrupt, or does not match."""
