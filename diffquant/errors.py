"""Project errors: expected failures that the CLI prints as one line, never a traceback.

Every error carries `what` (the thing that is wrong) and `fix` (what to do); `message` is
`<what> — <fix>`. `DiffquantError` and `ConfigError` are defined in `diffquant.quant.errors`, so
that `quant`, which imports nothing outside itself, raises the same classes: `except ConfigError`
catches a bad spec from `quant` as well as a bad preset from `models`. The mapping to the command
line's `Error: ...` line and exit code 2 lives in `diffquant.cli.errors` alone.

Example:
    >>> raise ArtifactError("shard-00003.safetensors is missing", "restore it, or recalibrate")
    Traceback (most recent call last):
    ...
    diffquant.errors.ArtifactError: shard-00003.safetensors is missing — restore it, or recalibrate
"""

from __future__ import annotations

from diffquant.quant.errors import ConfigError, DiffquantError

__all__ = ["ArtifactError", "ConfigError", "DiffquantError"]


class ArtifactError(DiffquantError):
    """A calibration artifact or checkpoint that is missing, corrupt, or does not match."""
