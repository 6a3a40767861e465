"""`diffquant verify`: recompute every sha256 an artifact or checkpoint records."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.artifacts.verification import verify_artifact
from diffquant.cli.params import ARTIFACT_PATH


@click.command("verify")
@click.argument("target", type=ARTIFACT_PATH)
def verify_command(target: Path | str) -> None:
    """Check the shards, statistics cache or checkpoint weights against their recorded sha256.

    Prints one line per file that is missing or differs and exits with 1; prints one summary line
    and exits with 0 when every file matches.

    \b
    Example:
      diffquant verify artifacts/calib/check
      diffquant verify artifacts/quantized/check-w8a8
    """
    report = verify_artifact(target)
    for problem in report.problems:
        click.echo(f"mismatch: {problem}")
    if report.problems:
        raise SystemExit(1)
    click.echo(f"ok: {report.files_checked} files of the {report.kind} {target} match their recorded sha256")
