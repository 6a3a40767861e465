"""The life of a calibration artifact's directory: open it fresh or to resume, refuse what is not
this run's, clean up what a killed run left, build an `--overwrite` beside the old artifact, and
merge the manifests of data-parallel ranks.

- `open_run(out, settings, overwrite, ranks)` creates `out` and returns the `OpenedRun`: the
  manifest to resume (None for a fresh start) and, for an `--overwrite`, the old artifact's files
  (the new one is built beside it and published in one step, `replace.replacing`; a store's
  unpublished or half-cleaned generation from a killed run is recovered first). A directory that holds other files, or another run's settings, is refused; a run that
  committed no shard binds nothing and is cleared. diffquant deletes only in a directory that
  holds one of its manifests, and there only what the manifest lists and its own names
  (`replace.owned_files`).
- `merge_rank_manifests(out, world)` joins the rank manifests into `manifest.json` in rank order,
  which is prompt order (`merge_ranks`: once every rank has finished).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from diffquant.artifacts.calibration_records import RunSettings
    >>> settings = RunSettings(model="m", source="s", revision=None, pipeline_class="P", torch_dtype="float32", variant=None,
    ...                        target="unet", prompts_sha256="0" * 64, num_prompts=1, steps=1, seed=0, pipeline_kwargs={},
    ...                        device="cpu", shard_size_bytes=1024, shard_format={"name": "safetensors", "compression": "none"},
    ...                        num_processes=1)
    >>> work = tempfile.TemporaryDirectory()
    >>> opened = open_run(ArtifactLocation(Path(work.name) / "calib"), settings, overwrite=False)
    >>> opened.manifest is None, opened.replaced is None  # a fresh start
    (True, True)
    >>> (Path(work.name) / "other").mkdir(); (Path(work.name) / "other" / "notes.txt").write_text("mine")
    4
    >>> open_run(ArtifactLocation(Path(work.name) / "other"), settings, overwrite=True)
    Traceback (most recent call last):
    ...
    diffquant.errors.ArtifactError: output directory .../other is not empty and holds no calibration manifest, so diffquant will not write or delete there (--overwrite replaces only diffquant artifacts) — choose an empty or new --out
    >>> work.cleanup()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from diffquant.artifacts.atomic import PARTIAL_SUFFIX
from diffquant.artifacts.calibration_format import MANIFEST_NAME, SHARD_PREFIX, rank_manifest_name, rank_shard_prefix
from diffquant.artifacts.calibration_records import CalibrationManifest, RunSettings, load_manifest
from diffquant.artifacts.fingerprint import weights_fingerprint
from diffquant.artifacts.location import ArtifactLocation, checked_name
from diffquant.artifacts.replace import OWN_NAME, RANK_MANIFEST, owned_files, recover_generation, recover_switch
from diffquant.errors import ArtifactError, ConfigError


class RankGroup(Protocol):
    """The processes of a (data-parallel) run, as the lifecycle needs them (`stages.ranks.Ranks`)."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


@dataclass(frozen=True)
class _SingleProcess:
    rank: int = 0
    world: int = 1
    is_main: bool = True

    def barrier(self) -> None:
        return None


@dataclass(frozen=True)
class OpenedRun:
    """What `open_run` found: the manifest this process resumes from (None: a fresh start) and, for
    an `--overwrite`, the names of the old artifact's files (the new one is built beside it; on a
    data-parallel rank other than 0, an empty set: it builds into the replacement too)."""

    manifest: CalibrationManifest | None
    replaced: set[str] | None = None

    @property
    def complete(self) -> bool:
        """A finished run (a merged one, for data-parallel ranks): nothing is left to do."""
        return self.manifest is not None and self.manifest.complete and self.manifest.rank is None


def open_run(out: ArtifactLocation, settings: RunSettings, overwrite: bool, ranks: RankGroup = _SingleProcess()) -> OpenedRun:
    """Open `out` for the run of `settings` (see the module docstring). Rank 0 checks and prepares
    `out` while the other ranks wait; then a data-parallel rank takes the merged manifest (when the
    run is complete) or its own rank manifest."""
    opened = _prepare_output(out, settings, overwrite) if ranks.is_main else OpenedRun(None)
    ranks.barrier()
    if ranks.world > 1 and overwrite:
        # Every rank starts afresh into the replacement; only rank 0 knows (and later deletes) the old files.
        if not ranks.is_main:
            opened = OpenedRun(None, set() if out.names() else None)  # rank 0 waits at the barrier: `out` is as it left it
        ranks.barrier()
        return opened
    if ranks.world > 1:
        merged = load_manifest(out) if out.is_file(MANIFEST_NAME) else None
        opened = OpenedRun(merged if merged is not None else _rank_resume_state(out, settings, ranks.rank))
    return opened


def check_same_weights(out: ArtifactLocation, manifest: CalibrationManifest, target: torch.nn.Module) -> None:
    """Refuse to resume or to call complete a run whose model's weights have changed since."""
    model = manifest.model or {}
    recorded = model.get("target_weights_sha256")
    if recorded is not None and recorded != weights_fingerprint(target):
        raise ArtifactError(
            f"{out} holds a calibration run of {model.get('name')!r} whose weights differ from the model's now "
            "(fine-tuned, fused or re-saved since)",
            "calibrate into another --out, or pass --overwrite to replace the run",
        )


def check_shared_store(out: ArtifactLocation, world: int) -> None:
    """Refuse a `memory://` output for data-parallel ranks: each process has its own memory store."""
    if world > 1 and out.url.startswith("memory://"):
        raise ConfigError(f"--out {out} is a memory:// store, which each rank's process holds apart",
                          "give data-parallel ranks a store they share: a local directory, s3://, gs://")


def merge_rank_manifests(out: ArtifactLocation, world: int) -> CalibrationManifest:
    """Join the rank manifests of a data-parallel run into `manifest.json` (rank order = prompt
    order), then delete them. Sample positions, counters and the schema are combined."""
    parts = [load_manifest(out, rank_manifest_name(rank)) for rank in range(world)]
    unfinished = [part.rank.index if part.rank else rank for rank, part in enumerate(parts) if not part.complete]
    if unfinished:
        raise ArtifactError(f"ranks {unfinished} of {out} did not finish", "re-run the same command to resume them")
    merged = parts[0].snapshot()
    merged.rank = None
    merged.schema, merged.shards = {}, []
    merged.num_samples = merged.num_prompts_done = merged.raw_bytes = merged.stored_bytes = 0
    for part in parts:
        for shard in part.shards:
            merged.shards.append(shard.at(merged.num_samples))
            merged.num_samples += shard.num_samples
        merged.num_prompts_done += part.num_prompts_done
        merged.raw_bytes += part.raw_bytes
        merged.stored_bytes += part.stored_bytes
        for path, entry in part.schema.items():
            known = merged.schema.setdefault(path, entry)
            if known != entry:
                merged.schema[path] = {"const": None, "varies": True} if "const" in entry else {**known, "shape": None, "varies": True}
    out.write_json(MANIFEST_NAME, merged.to_json())
    for rank in range(world):
        out.remove(rank_manifest_name(rank))
    return merged


def merge_ranks(out: ArtifactLocation, ranks: RankGroup, finished: CalibrationManifest) -> CalibrationManifest:
    """After every rank has `finished` its own manifest: rank 0 merges them (`merge_rank_manifests`)
    once all have arrived; returns the merged manifest on rank 0, `finished` elsewhere. The caller
    holds the ranks at a barrier again once the merged artifact is published."""
    if ranks.world == 1:
        return finished
    ranks.barrier()
    return merge_rank_manifests(out, ranks.world) if ranks.is_main else finished


def _prepare_output(out: ArtifactLocation, settings: RunSettings, overwrite: bool) -> OpenedRun:
    if out.local is not None:
        recover_switch(out.local)
    else:
        recover_generation(out)
    out.make()
    entries = out.names()
    if entries and all(OWN_NAME.match(name) and name.endswith(PARTIAL_SUFFIX) for name in entries):
        for name in entries:  # killed while writing the very first manifest
            out.remove(name)
        entries = []
    if not entries:
        return OpenedRun(None)
    has_manifest = out.is_file(MANIFEST_NAME)
    rank_manifests = [name for name in entries if RANK_MANIFEST.match(name)]
    if not has_manifest and not rank_manifests:
        raise ArtifactError(
            f"output directory {out} is not empty and holds no calibration manifest, so diffquant will not write or delete there"
            + (" (--overwrite replaces only diffquant artifacts)" if overwrite else ""),
            "choose an empty or new --out",
        )
    if overwrite:
        return OpenedRun(None, owned_files(out))
    if not has_manifest:
        parts = [load_manifest(out, name) for name in rank_manifests]
        if not any(part.shards for part in parts):  # no rank committed anything: start afresh
            _remove_owned(out)
            return OpenedRun(None)
        _check_settings(out, parts[0], settings)
        return OpenedRun(None)
    manifest = load_manifest(out)
    if not manifest.complete and not manifest.shards:
        # A run that failed or was killed before committing a shard holds nothing worth keeping,
        # so it does not bind the directory to its settings.
        _remove_owned(out)
        return OpenedRun(None)
    _check_settings(out, manifest, settings)
    if not manifest.complete:
        _drop_uncommitted_files(out, manifest, SHARD_PREFIX)
    return OpenedRun(manifest)


def _rank_resume_state(out: ArtifactLocation, settings: RunSettings, rank: int) -> CalibrationManifest | None:
    """The manifest of this rank's earlier, unfinished run (its leftovers removed), or None."""
    if not out.is_file(rank_manifest_name(rank)):
        return None
    manifest = load_manifest(out, rank_manifest_name(rank))
    _check_settings(out, manifest, settings)
    _drop_uncommitted_files(out, manifest, rank_shard_prefix(rank))
    return manifest


def _check_settings(out: ArtifactLocation, manifest: CalibrationManifest, settings: RunSettings) -> None:
    if manifest.settings != settings:
        raise ArtifactError(
            f"{out} holds a calibration run with other settings ({', '.join(settings.differing(manifest.settings))} differ)",
            "re-run the original command to resume it, choose another --out, or pass --overwrite",
        )


def _remove_owned(out: ArtifactLocation) -> None:
    for name in sorted(owned_files(out)):
        out.remove(name)


def _drop_uncommitted_files(out: ArtifactLocation, manifest: CalibrationManifest, prefix: str) -> None:
    """Delete what a killed run (or rank) left behind that its manifest does not list, among the
    files of its own shard prefix (in a store, a shard written in place but never committed);
    check the listed shards."""
    listed = {checked_name(shard.file, f"{out}/{MANIFEST_NAME}") for shard in manifest.shards}
    for name in out.names():
        if not name.startswith(prefix) or not OWN_NAME.match(name):
            continue
        if name.endswith(PARTIAL_SUFFIX) or name not in listed:
            out.remove(name)
    for shard in manifest.shards:
        if not out.exists(shard.file) or out.size(shard.file) != shard.bytes:
            raise ArtifactError(
                f"shard {out}/{shard.file} listed in the manifest is missing or has the wrong size",
                "the artifact was damaged; pass --overwrite to start again",
            )
