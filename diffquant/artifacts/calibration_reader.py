"""Read a calibration artifact back: memory-mapped shards, samples rebuilt for `model(**sample)`.

`CalibrationArtifact` checks the manifest field by field and every shard it lists (inside the
artifact, present, recorded size; the sha256 too with `verify=True`, streamed, once per shard)
before any work, and indexes the per-sample records from the shard headers, checked against the
manifest's schema. A tensor read later must have the schema's dtype and finite values, and a
reader whose artifact is replaced under it (its manifest's hash changes) stops with one line. `CalibrationDataset` is a `torch.utils.data.Dataset` over a selection of samples; shards
are opened lazily per process with `safe_open`, whose tensors lie in a private, copy-on-write
mapping of the file, so nothing is loaded into RAM until it is touched.

Example (an artifact of two samples, written directly; `diffquant calibrate` writes real ones):
    >>> import tempfile
    >>> from diffquant.artifacts.calibration_records import CalibrationManifest
    >>> from diffquant.artifacts.calibration_writer import CalibrationWriter, CapturedSample
    >>> workdir = tempfile.TemporaryDirectory()
    >>> out = Path(workdir.name)
    >>> with CalibrationWriter(out, CalibrationManifest(), shard_size_bytes=1 << 20) as writer:
    ...     for step in range(2):
    ...         kwargs = {"x": torch.full((1, 4), float(step)), "added_cond_kwargs": {"time_ids": torch.arange(3.0)}}
    ...         writer.add(CapturedSample(prompt_index=0, step=step, timestep=999.0 - step, kwargs=kwargs))
    ...     writer.end_prompt(0)
    ...     writer.finish()
    >>> artifact = CalibrationArtifact(out, verify=True)
    >>> artifact.record.num_samples, artifact.record.shards[0].num_prompts
    (2, 1)
    >>> [(record.step, record.timestep) for record in artifact.records]
    [(0, 999.0), (1, 998.0)]
    >>> for sample in calibration_loader(CalibrationDataset(artifact, SampleSelection(timestep_max=998.5))):
    ...     print(sample["x"].tolist(), sample["added_cond_kwargs"]["time_ids"].tolist())
    [[1.0, 1.0, 1.0, 1.0]] [0.0, 1.0, 2.0]
    >>> workdir.cleanup()
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils._pytree import tree_map_only

from diffquant.artifacts.calibration_format import MANIFEST_NAME, json_sha256
from diffquant.artifacts.calibration_records import CalibrationManifest, read_document
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.artifacts.tree import tensor_paths, unflatten_sample
from diffquant.errors import ArtifactError, ConfigError, DiffquantError
from diffquant.artifacts.fingerprint import module_fingerprint, weights_fingerprint


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives: its shard, structure, tensor names, and where it was captured."""

    id: int
    prompt: int
    step: int
    timestep: float | None
    shard: str
    structure: dict[str, Any]
    tensors: dict[str, str]


@dataclass(frozen=True)
class SampleSelection:
    """Which samples to use, applied in this order:

    1. timestep_min / timestep_max: keep samples whose timestep lies in the range (inclusive);
    2. uniform_steps: keep only n denoising-step indices spread evenly over the steps present
       (first and last included), since activation ranges shift with the timestep (Q-Diffusion,
       Li et al., 2023) and a few evenly spaced steps cover the trajectory;
    3. max_per_step: at most n samples of each step index (the earliest prompts first);
    4. every: every k-th remaining sample; 5. limit: the first n of those.
    """

    limit: int | None = None
    every: int = 1
    timestep_min: float | None = None
    timestep_max: float | None = None
    uniform_steps: int | None = None
    max_per_step: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"sample selection every={self.every} is not allowed", "use every >= 1")
        for name in ("limit", "uniform_steps", "max_per_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"sample selection {name}={value} is not allowed", f"use {name} >= 1, or leave it out")

    def apply(self, records: Sequence[SampleRecord]) -> list[int]:
        chosen = [
            index
            for index, record in enumerate(records)
            if record.timestep is None
            or (
                (self.timestep_min is None or record.timestep >= self.timestep_min)
                and (self.timestep_max is None or record.timestep <= self.timestep_max)
            )
        ]
        if self.uniform_steps is not None:
            steps = sorted({records[i].step for i in chosen})
            if len(steps) > self.uniform_steps:
                if self.uniform_steps == 1:
                    keep = {steps[0]}
                else:
                    keep = {steps[round(k * (len(steps) - 1) / (self.uniform_steps - 1))] for k in range(self.uniform_steps)}
                chosen = [i for i in chosen if records[i].step in keep]
        if self.max_per_step is not None:
            taken: dict[int, int] = {}
            kept = []
            for i in chosen:
                step = records[i].step
                if taken.get(step, 0) < self.max_per_step:
                    taken[step] = taken.get(step, 0) + 1
                    kept.append(i)
            chosen = kept
        chosen = chosen[:: self.every]
        return chosen[: self.limit] if self.limit is not None else chosen

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CalibrationArtifact:
    """A checked, indexed, read-only calibration artifact: a local directory or an fsspec URL.

    `record` is the typed manifest; `manifest` the JSON document it was read from, as written.
    """

    def __init__(self, path: Path | str | ArtifactLocation, verify: bool = False) -> None:
        self.location = path if isinstance(path, ArtifactLocation) else ArtifactLocation(path)
        self.path = self.location.target
        self.manifest = read_document(self.location, MANIFEST_NAME)
        self.record = CalibrationManifest.from_json(self.manifest, f"{self.location}/{MANIFEST_NAME}")
        if not self.record.complete:
            raise ArtifactError(
                f"calibration artifact {self.path} is incomplete ({self.record.num_prompts_done} of "
                f"{(self.record.prompts or {}).get('count', '?')} prompts)",
                "re-run the same `diffquant calibrate` command to finish it",
            )
        self.shard_format = ShardFormat(**(self.record.shard_format or {}))
        self._check_shards(verify)
        self.records = self._index_records()
        self._handles: dict[str, Any] = {}
        self._tensor_cache: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @functools.cached_property
    def manifest_sha256(self) -> str:
        return json_sha256(self.manifest)

    def check_unchanged(self) -> None:
        """Stop when `manifest.json` no longer is the one this reader checked (replaced under it)."""
        try:
            current = json_sha256(self.location.read_json(MANIFEST_NAME))
        except (OSError, ArtifactError):
            current = None
        if current != self.manifest_sha256:
            raise ArtifactError(f"calibration artifact {self.path} was replaced or removed while it was being read",
                                "re-run once the run that replaced it has finished")

    def check_model(self, module: torch.nn.Module) -> None:
        """Refuse a model whose class, config or (when recorded) weights differ from the one calibrated."""
        found = module_fingerprint(module)
        model = self.record.model or {}
        if not isinstance(model.get("target_class"), str) or not isinstance(model.get("target_config_sha256"), str):
            raise ArtifactError(f"calibration artifact {self.path} records no target model (model.target_class, model.target_config_sha256)",
                                "recalibrate with `diffquant calibrate`")
        expected = {"class": model["target_class"], "config_sha256": model["target_config_sha256"]}
        if found == expected and model.get("target_weights_sha256") not in (None, weights_fingerprint(module)):
            found = {**found, "weights": "changed"}
        if found != expected:
            what = "class" if found["class"] != expected["class"] else "config" if found["config_sha256"] != expected["config_sha256"] else "weights (fine-tuned, fused or re-saved since)"
            raise ArtifactError(
                f"calibration artifact {self.path} was captured from {expected['class']} of model "
                f"{model.get('name')!r}, and the model given differs in its {what}",
                f"quantize model {model.get('name')!r}, or calibrate the model you are quantizing",
            )

    def sample(self, index: int) -> dict[str, Any]:
        """Sample `index` as the nested kwargs dict the submodule's forward takes.

        Tensors are read-only views of the memory-mapped shard: a tensor that several samples
        share (text embeddings, time ids) is the same tensor object in each of them.
        """
        record = self.records[index]
        tensors = self._shard_tensors(record.shard)
        values = {}
        for path, name in record.tensors.items():
            tensor = tensors.get(name)
            if tensor is None:
                tensor = tensors[name] = self._fetch(record, name)
            values[path] = tensor
        return unflatten_sample(record.structure, values)

    def _fetch(self, record: SampleRecord, name: str) -> torch.Tensor:
        """Tensor `name` of `record`'s shard; a read that fails (a damaged chunk, a store that
        cannot be reached) is a one-line error naming the shard."""
        try:
            tensor = self._handle(record.shard).get(name)
        except DiffquantError:
            raise
        except Exception as exc:  # zarr, safetensors and every fsspec backend raise their own types
            raise ArtifactError(f"reading sample {record.id} from calibration shard {self.location}/{record.shard} failed "
                                f"({type(exc).__name__}: {exc})", "restore the shard, or check the store's URL and credentials") from exc
        path = next(p for p, n in record.tensors.items() if n == name)
        expected = self.record.schema.get(path, {}).get("dtype")
        where = f"calibration shard {self.location}/{record.shard}: sample {record.id} input {path}"
        if expected is not None and str(tensor.dtype).removeprefix("torch.") != expected:
            raise ArtifactError(f"{where} is {str(tensor.dtype).removeprefix('torch.')}, the schema records {expected}", "restore the shard, or recalibrate")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ArtifactError(f"{where} holds non-finite values", "restore the shard, or recalibrate")
        return tensor

    def _handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            self.check_unchanged()  # a shard opened now must belong to the artifact checked at the start
            handle = self._handles[shard] = self.shard_format.open(self.location, shard)
        return handle

    def _shard_tensors(self, shard: str) -> dict[str, torch.Tensor]:
        """The tensors fetched so far from `shard` (views of its mapping, so they cost no RAM),
        kept for the last two shards used: samples are read in shard order. An evicted shard's
        handle goes too (a shard in a remote store is held in RAM by its handle)."""
        if self._tensor_cache and next(reversed(self._tensor_cache)) == shard:
            return self._tensor_cache[shard]  # the shard of the previous sample: nothing to reorder
        cache = self._tensor_cache.pop(shard, None) or {}
        self._tensor_cache[shard] = cache
        while len(self._tensor_cache) > 2:
            evicted = next(iter(self._tensor_cache))
            del self._tensor_cache[evicted]
            self._handles.pop(evicted, None)
        return cache

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own mappings.
        return {**self.__dict__, "_handles": {}, "_tensor_cache": {}}

    def _check_shards(self, verify: bool) -> None:
        for shard in self.record.shards:
            path = f"{self.location}/{shard.file}"
            if not self.location.exists(shard.file):
                raise ArtifactError(f"calibration shard {path} is missing", "restore it, or recalibrate")
            size = self.location.size(shard.file)
            if size != shard.bytes:
                raise ArtifactError(
                    f"calibration shard {path} has {size} bytes, the manifest records {shard.bytes}",
                    "the shard is truncated or replaced; restore it, or recalibrate",
                )
            if verify and self.location.sha256(shard.file) != shard.sha256:
                raise ArtifactError(f"calibration shard {path} fails its sha256 check", "restore it, or recalibrate (or pass --no-verify)")

    def _index_records(self) -> list[SampleRecord]:
        records: list[SampleRecord] = []
        for shard in self.record.shards:
            path = f"{self.location}/{shard.file}"
            try:
                header = self.shard_format.open(self.location, shard.file).header()
            except DiffquantError:
                raise
            except Exception as exc:  # safetensors and zarr raise their own error types for damaged files
                raise ArtifactError(f"calibration shard {path} cannot be read ({exc})", "restore it, or recalibrate") from exc
            if not header:
                raise ArtifactError(f"calibration shard {path} has no diffquant header", "restore it, or recalibrate")
            structures, samples = _parse_header(header, path, shard.num_samples)
            for raw in samples:
                self._check_schema(raw, structures[raw["structure"]], path)
                records.append(
                    SampleRecord(
                        # Ids are positions in the artifact's order (shards of a data-parallel
                        # run number their samples per rank).
                        id=len(records),
                        prompt=raw["prompt"],
                        step=raw["step"],
                        timestep=raw["timestep"],
                        shard=shard.file,
                        structure=structures[raw["structure"]],
                        tensors=raw["tensors"],
                    )
                )
        if len(records) != self.record.num_samples:
            raise ArtifactError(
                f"calibration artifact {self.path} lists {self.record.num_samples} samples, its shards hold {len(records)}",
                "the artifact is damaged; recalibrate",
            )
        return records


    def _check_schema(self, raw: dict[str, Any], structure: dict[str, Any], path: str) -> None:
        """A sample's tensor paths must be the ones its structure names and the schema lists."""
        schema = self.record.schema
        named = set(tensor_paths(structure))
        if set(raw["tensors"]) != named:
            raise ArtifactError(f"calibration shard {path}: sample records and structure disagree on its tensors", "restore it, or recalibrate")
        unknown = sorted(p for p in named if "dtype" not in schema.get(p, {}))
        if unknown:
            raise ArtifactError(f"calibration shard {path} holds input {unknown[0]}, which the manifest's schema does not list as a tensor",
                                "restore the shard or manifest.json, or recalibrate")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite, in one fast pass: a NaN or an
    infinity makes the float32 (float64) sum non-finite, so a finite sum proves all elements are;
    only a non-finite sum (a NaN, an infinity, or an overflow of the sum) needs the exact test."""
    try:
        total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    except (RuntimeError, TypeError):  # float8 has no sum kernel on some builds
        total = tensor.float().sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all())


def _parse_header(header: str, path: str, expected_samples: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (structures, sample records) of a shard header, each field checked."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"calibration shard {path} has a malformed header ({what})", "restore it, or recalibrate")

    try:
        content = json.loads(header)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON: {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("structures"), list) or not isinstance(content.get("samples"), list):
        raise bad("it needs lists `structures` and `samples`")
    structures, samples = content["structures"], content["samples"]
    if len(samples) != expected_samples:
        raise bad(f"{len(samples)} samples, the manifest records {expected_samples}")
    for index, raw in enumerate(samples):
        if not isinstance(raw, dict):
            raise bad(f"samples[{index}] is not a mapping")
        for field in ("prompt", "step", "structure"):
            if not isinstance(raw.get(field), int) or isinstance(raw.get(field), bool) or raw[field] < 0:
                raise bad(f"samples[{index}].{field} is {raw.get(field)!r}, not an integer >= 0")
        if raw["structure"] >= len(structures) or not isinstance(structures[raw["structure"]], dict):
            raise bad(f"samples[{index}].structure {raw['structure']} names no structure")
        timestep = raw.get("timestep")
        if timestep is not None and (not isinstance(timestep, (int, float)) or isinstance(timestep, bool) or not math.isfinite(timestep)):
            raise bad(f"samples[{index}].timestep is {timestep!r}, not a finite number or null")
        if not isinstance(raw.get("tensors"), dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw["tensors"].items()):
            raise bad(f"samples[{index}].tensors is not a mapping of names")
    return structures, samples


class CalibrationDataset(torch.utils.data.Dataset):
    """The selected samples of an artifact, each as forward kwargs (tensors memory-mapped)."""

    def __init__(self, artifact: CalibrationArtifact, selection: SampleSelection | None = None, indices: Sequence[int] | None = None) -> None:
        self.artifact = artifact
        self.selection = selection or SampleSelection()
        self.indices = list(indices) if indices is not None else self.selection.apply(artifact.records)
        if not self.indices:
            raise ConfigError(f"the sample selection {self.selection.describe()} matches no sample of {artifact.path}", "widen the selection")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.artifact.sample(self.indices[index])


def calibration_loader(dataset: CalibrationDataset, device: str | torch.device = "cpu", num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Iterate the dataset one sample at a time (a sample already holds the pipeline's batch, e.g.
    both halves of classifier-free guidance) and move each sample to `device`.

    With `num_workers` > 0 a DataLoader reads in worker processes (worth it when shards are on a
    slow disk and samples are large); with 0 the dataset is iterated directly, since a DataLoader
    in the main process only adds per-sample overhead.
    """
    target = torch.device(device)
    on_cpu = target.type == "cpu"  # samples are read into CPU memory: for the CPU nothing moves
    if num_workers == 0:
        getitem = dataset.__getitem__
        for index in range(len(dataset)):
            sample = getitem(index)
            yield sample if on_cpu else move_to_device(sample, target)
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=target.type == "cuda", persistent_workers=False,
    )
    for sample in loader:
        yield sample if on_cpu else move_to_device(sample, target)


def move_to_device(value: Any, device: str | torch.device) -> Any:
    """Move every tensor in a nested sample to `device` (non-blocking where pinned)."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device, non_blocking=True), value)
