"""Click parameter types shared by the commands."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.artifacts.location import artifact_target


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


ARTIFACT_PATH = ArtifactPathType()
