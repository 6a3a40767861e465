"""`diffquant convert`: rewrite a calibration artifact in the other shard format."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.cli.inspect import artifact_summary, echo_summary
from diffquant.cli.params import ARTIFACT_PATH
from diffquant.stages.convert import convert_artifact


@click.command("convert")
@click.argument("source", type=ARTIFACT_PATH)
@click.argument("destination", type=ARTIFACT_PATH)
@click.option("--format", "shard_format", type=click.Choice(["safetensors", "zarr"]), required=True, help="Shard format of DESTINATION.")
@click.option("--compression", type=click.Choice(["none", "zstd", "blosc"]), default="none", help="zarr compression.")
@click.option("--overwrite", is_flag=True, help="Replace an artifact already in DESTINATION.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of SOURCE's shards before reading them.")
@click.option("--json", "as_json", is_flag=True, help="Print the new artifact's summary as JSON.")
def convert_command(source: Path | str, destination: Path | str, shard_format: str, compression: str, overwrite: bool, no_verify: bool,
                    as_json: bool) -> None:
    """Convert a calibration artifact between safetensors and zarr shards (samples stay bit-identical).

    \b
    Example:
      diffquant convert artifacts/calib/check artifacts/calib/check-zarr --format zarr --compression zstd
      diffquant convert artifacts/calib/check s3://my-bucket/calib/check --format zarr    # upload
    """
    convert_artifact(source, destination, ShardFormat(shard_format, compression), overwrite, show_progress=not as_json, verify=not no_verify)
    echo_summary(artifact_summary(destination), as_json)
