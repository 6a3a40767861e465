"""The project's error types: expected failures carrying what is wrong and how to fix it.

They live in `quant` because it is the one package that may import nothing outside itself, so the
base class has to be here for `quant` to raise it; `diffquant.errors` re-exports both and adds
`ArtifactError`. No error knows about the command line: `diffquant.cli.errors` turns them into
the one-line `Error: <what> — <fix>` and exit code 2.

Example:
    >>> error = ConfigError("granularity 'per_row' is not allowed", "use per_tensor or per_channel")
    >>> error.what, error.fix
    ("granularity 'per_row' is not allowed", 'use per_tensor or per_channel')
    >>> str(error)
    "granularity 'per_row' is not allowed — use per_tensor or per_channel"
    >>> isinstance(error, ValueError)
    True
"""

from __future__ import annotations


class DiffquantError(Exception):
    """An expected failure: `what` names the thing that is wrong, `fix` what to do about it."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        super().__init__(what, fix)
        self.what = what
        self.fix = fix

    @property
    def message(self) -> str:
        """The one line a user reads: `<what> — <fix>`, or `<what>` alone without a fix."""
        return f"{self.what} — {self.fix}" if self.fix else self.what

    def __str__(self) -> str:
        return self.message


class ConfigError(DiffquantError, ValueError):
    """A preset, recipe, spec or command-line value that is not allowed."""
