"""`diffquant inspect`: summarize a calibration artifact or a quantized checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from diffquant.artifacts.calibration_records import load_manifest
from diffquant.artifacts.checkpoint import MANIFEST_NAME as CHECKPOINT_MANIFEST
from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.artifacts.location import ArtifactLocation
from diffquant.cli.params import ARTIFACT_PATH
from diffquant.cli.summary import human_bytes, print_table


@click.command("inspect")
@click.argument("directory", type=ARTIFACT_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def inspect_command(directory: Path | str, as_json: bool) -> None:
    """Summarize a calibration artifact (model, target, samples, shards, bytes, schema) or a
    quantized checkpoint (recipe, every layer's format and quality, sizes, overall quality).

    \b
    Example:
      diffquant inspect artifacts/calib/check --json
      diffquant inspect artifacts/quantized/check-w8a8
    """
    if isinstance(directory, Path) and (directory / CHECKPOINT_MANIFEST).is_file():
        echo_checkpoint(directory, as_json)
        return
    echo_summary(artifact_summary(directory), as_json)


def echo_checkpoint(directory: Path, as_json: bool) -> None:
    """The summary `diffquant quantize` prints, read back from a checkpoint's manifest."""
    from diffquant.cli.quantize import checkpoint_summary, print_layer_report

    manifest = read_checkpoint_manifest(directory).to_json()
    summary = checkpoint_summary(manifest, directory)
    if as_json:
        layers = [{"name": layer["name"], "type": layer["type"], "weight_format": layer["weight_format"],
                   "input": layer["input"]["dtype"] if layer["input"] else None, "quality": layer["quality"]} for layer in manifest["layers"]]
        click.echo(json.dumps({**summary, "layers": layers, "skipped": manifest["skipped"]}, sort_keys=True))
        return
    print_layer_report(manifest)
    click.echo("")
    print_table(["field", "value"], [[key, str(value)] for key, value in summary.items()])


def artifact_summary(directory: Path | str) -> dict[str, Any]:
    """The summary of a calibration artifact (a directory or a store URL), as printed by `inspect --json`."""
    location = ArtifactLocation(directory)
    record = load_manifest(location)
    model, pipeline = record.model or {}, record.pipeline or {}
    return {
        "path": str(location),
        "status": record.status,
        "model": model["name"],
        "source": model["source"],
        "pipeline_class": model["pipeline_class"],
        "torch_dtype": model["torch_dtype"],
        "target": model["target"],
        "target_class": model["target_class"],
        "family": model.get("family"),
        "quant_exclude": model.get("quant_exclude", []),
        "num_prompts": record.num_prompts_done,
        "num_prompts_planned": (record.prompts or {})["count"],
        "steps": pipeline["steps"],
        "seed": pipeline["seed"],
        "pipeline_kwargs": pipeline["kwargs"],
        "num_samples": record.num_samples,
        "num_shards": len(record.shards),
        "total_bytes": record.stored_bytes,
        "raw_bytes": record.raw_bytes,
        "dedup_ratio": record.stored_bytes / record.raw_bytes if record.raw_bytes else None,
        "schema": record.schema,
    }


def echo_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    print_table(
        ["field", "value"],
        [
            ["artifact", summary["path"]],
            ["status", summary["status"]],
            ["model", f"{summary['model']} ({summary['source']})"],
            ["target", f"{summary['target']} ({summary['target_class']}, {summary['torch_dtype']})"],
            ["family", f"{summary['family']} (excluded: {', '.join(summary['quant_exclude']) or 'nothing'})"],
            ["prompts", f"{summary['num_prompts']} of {summary['num_prompts_planned']}, {summary['steps']} steps, seed {summary['seed']}"],
            ["pipeline kwargs", json.dumps(summary["pipeline_kwargs"], sort_keys=True)],
            ["samples", summary["num_samples"]],
            ["shards", summary["num_shards"]],
            ["stored bytes", human_bytes(summary["total_bytes"])],
            ["raw captured bytes", human_bytes(summary["raw_bytes"])],
            ["stored / raw", f"{summary['dedup_ratio']:.3f}" if summary["dedup_ratio"] else "-"],
        ],
    )
    click.echo("")
    rows = []
    for path, entry in sorted(summary["schema"].items()):
        if "const" in entry:
            rows.append([path, "const", json.dumps(entry["const"])])
        else:
            shape = "varies" if entry.get("shape") is None else "x".join(map(str, entry["shape"])) or "scalar"
            rows.append([path, entry["dtype"], shape])
    print_table(["input", "dtype", "shape / value"], rows)
