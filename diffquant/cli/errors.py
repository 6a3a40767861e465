"""The one table that turns expected exceptions into the command line's one-line error.

The library raises plain exceptions (`diffquant.errors`) that carry what is wrong and the fix;
only here do they meet click. `ERROR_MESSAGES` maps an exception type to the line printed after
`Error: `, or None to let the traceback through (an error nobody expected is a bug to report).
Every mapped error exits with code 2.

Example:
    >>> from diffquant.errors import ArtifactError
    >>> format_known_error(ArtifactError("out/manifest.json is missing", "recalibrate"))
    'out/manifest.json is missing — recalibrate'
    >>> format_known_error(KeyError("steps")) is None
    True
"""

from __future__ import annotations

import errno
from typing import Any, Callable

import click

from diffquant.errors import DiffquantError

EXIT_CODE = 2


def _disk_full(exc: OSError) -> str | None:
    if exc.errno != errno.ENOSPC:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"no space left on the device{where} — free space there, or write to another directory"


ERROR_MESSAGES: dict[type[BaseException], Callable[[Any], str | None]] = {
    DiffquantError: lambda exc: exc.message,
    OSError: _disk_full,
}


def format_known_error(exc: BaseException) -> str | None:
    """The one-line message for `exc` from the first matching type of `ERROR_MESSAGES`, else None."""
    for kind, message in ERROR_MESSAGES.items():
        if isinstance(exc, kind):
            return message(exc)
    return None


class CommandLineError(click.ClickException):
    """A known error on its way out: click prints `Error: <message>` and exits with code 2."""

    exit_code = EXIT_CODE


class ErrorMappingGroup(click.Group):
    """A command group whose subcommands' known errors (raised while parsing their options or
    running) become `CommandLineError`s."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = format_known_error(exc)
            if message is None:
                raise
            raise CommandLineError(message) from exc
