"""Click parameter types and option parsers shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from diffquant.artifacts.location import artifact_target
from diffquant.errors import ConfigError


class ArtifactPathType(click.ParamType):
    """A calibration artifact's place: a local directory (a `Path`) or an fsspec URL (kept as text,
    since `Path` would fold the `//` of `s3://bucket/...`)."""

    name = "DIR|URL"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{value!r} is not a directory or a store URL", param, ctx)
        return artifact_target(value)


class LocalDirType(click.ParamType):
    """An output directory that must be local (checkpoints, sweeps): a store URL is refused
    rather than taken as a relative path such as `./s3:/bucket/...`."""

    name = "DIR"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        target = artifact_target(str(value))
        if isinstance(target, str):
            option = param.opts[0] if param is not None and param.opts else "the output"
            raise ConfigError(f"{option} {target} is a store URL, and this output is written to a local directory",
                              f"pass a local {option} and copy the directory to the store afterwards")
        return target


ARTIFACT_PATH = ArtifactPathType()
LOCAL_DIR = LocalDirType()


def parse_set_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs to kwargs; values are parsed as YAML scalars (5.0, true, 256, text)."""
    import yaml

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE", "write e.g. --set guidance_scale=5.0")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value  # not a YAML scalar: the text itself
        if not isinstance(parsed, (type(None), bool, int, float, str)):
            raise ConfigError(f"--set {pair!r} is a {type(parsed).__name__}, not a scalar", "pass a number, true/false, or text")
        kwargs[key.strip()] = parsed
    return kwargs
