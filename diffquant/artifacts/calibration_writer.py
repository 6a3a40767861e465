"""CalibrationWriter: streams captured samples to size-bounded shards on a thread.

The capturing thread hands samples to a bounded queue; the writer thread deduplicates tensors by
content within the open shard, and closes the shard at the first prompt boundary after it holds
`shard_size_bytes`. A closed shard (safetensors or zarr, `shard_formats.py`) is published (locally:
written under a `.partial` name, fsynced and renamed; in a remote store: `location.py`), then the
manifest is rewritten atomically: the manifest is the commit point of a resumable run. Peak
memory is the queue plus one shard (plus at most one prompt's overflow), whatever the prompt count.

Example:
    >>> import tempfile
    >>> workdir = tempfile.TemporaryDirectory()
    >>> out = Path(workdir.name)
    >>> text = torch.ones(2, 4, 8)  # the same tensor at every step: stored once
    >>> with CalibrationWriter(out, CalibrationManifest(), shard_size_bytes=256 << 20) as writer:
    ...     for step in range(2):
    ...         kwargs = {"sample": torch.full((2, 4, 8, 8), float(step)), "encoder_hidden_states": text}
    ...         writer.add(CapturedSample(prompt_index=0, step=step, timestep=999.0 - step, kwargs=kwargs))
    ...     writer.end_prompt(0)
    ...     writer.finish()
    >>> manifest = writer.manifest  # a snapshot: the writer owns its own
    >>> sorted(path.name for path in out.iterdir())
    ['manifest.json', 'shard-000000.safetensors']
    >>> manifest.status, manifest.num_samples, manifest.raw_bytes  # 2 x (2048 + 256) bytes captured
    ('complete', 2, 4608)
    >>> manifest.stored_bytes < 2048 + 2048 + 256 + 1024  # text stored once, plus the header
    True
    >>> workdir.cleanup()
"""

from __future__ import annotations

import ctypes
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffquant.artifacts.calibration_format import MANIFEST_NAME, SHARD_PREFIX, shard_name, tensor_digest
from diffquant.artifacts.calibration_records import CalibrationManifest, ShardEntry
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.artifacts.tree import constant_leaves, flatten_sample
from diffquant.errors import ArtifactError

_POLL_SECONDS = 0.5


@dataclass
class CapturedSample:
    """One call of the target submodule: its bound forward kwargs and where it happened."""

    prompt_index: int
    step: int
    timestep: float | None
    kwargs: dict[str, Any]


@dataclass
class WriterProgress:
    """Counters the progress bar reads; updated by the writer thread."""

    samples_written: int = 0
    bytes_written: int = 0


class CalibrationWriter:
    """Writes calibration shards and keeps `manifest.json` current after every shard.

    The writer works on its own copy of `manifest` (the run's manifest as loaded or freshly made):
    it commits each shard to it and extends its `schema`; `writer.manifest` is a snapshot of it.
    On `finish()` the status becomes
    `complete`; leaving the context without `finish()` (an error, a KeyboardInterrupt) flushes the
    prompts already complete, so a resumed run keeps them, and leaves the status `in_progress`.
    """

    def __init__(self, out: ArtifactLocation | Path | str, manifest: CalibrationManifest, shard_size_bytes: int, queue_size: int = 16,
                 manifest_name: str = MANIFEST_NAME, shard_prefix: str = SHARD_PREFIX) -> None:
        self.manifest_name = manifest_name
        self.shard_prefix = shard_prefix
        self.shard_format = ShardFormat(**(manifest.shard_format or {}))
        if shard_size_bytes <= 0:
            raise ArtifactError(f"shard size {shard_size_bytes} bytes is not positive", "pass --shard-size-mb > 0")
        self.location = out if isinstance(out, ArtifactLocation) else ArtifactLocation(out)
        self._manifest = manifest.snapshot()
        self.shard_size_bytes = shard_size_bytes
        self.progress = WriterProgress(samples_written=manifest.num_samples, bytes_written=manifest.stored_bytes)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="diffquant-calibration-writer", daemon=True)
        self._shard = _OpenShard()
        self._prompt_samples: list[dict[str, Any]] = []
        self._prompt_tensors: dict[str, torch.Tensor] = {}
        self._digest_memo: dict[int, tuple[torch.Tensor, str]] = {}
        self._prompt_keys: dict[str, str] = {}
        self._prompt_raw_bytes = 0

    def __enter__(self) -> "CalibrationWriter":
        # The manifest exists before the first shard: a run killed at any later point leaves a
        # manifest to resume from (and uncommitted shards it does not list, deleted on resume).
        self._write_manifest()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if self._thread.is_alive():
            self._put(("close", False), check=False)
            self._thread.join()
        if exc is None:
            self._raise_if_failed()

    @property
    def manifest(self) -> CalibrationManifest:
        """A snapshot of the manifest as last committed (read it after `finish()` for the final one)."""
        return self._manifest.snapshot()

    def add(self, sample: CapturedSample) -> None:
        """Queue one sample; blocks while the queue is full (the back-pressure that bounds memory)."""
        self._put(("sample", sample))

    def end_prompt(self, prompt_index: int) -> None:
        """Mark every sample of `prompt_index` as queued: the prompt becomes committable."""
        self._put(("end_prompt", prompt_index))

    def finish(self) -> None:
        """Flush the last shard, mark the manifest complete, and stop the thread."""
        self._put(("close", True))
        self._thread.join()
        self._raise_if_failed()

    def _put(self, item: tuple[str, Any], check: bool = True) -> None:
        while True:
            if check:
                self._raise_if_failed()
            if not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, ArtifactError):
                raise error
            raise ArtifactError(
                f"writing the calibration artifact in {self.location} failed: {error}",
                "check free disk space and permissions, then re-run the same command to resume",
            ) from error

    # The writer thread.
    def _run(self) -> None:
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "sample":
                    self._stage_sample(payload)
                elif kind == "end_prompt":
                    self._commit_prompt()
                    if self._shard.bytes >= self.shard_size_bytes:
                        self._flush_shard()
                else:
                    self._flush_shard()
                    if payload:
                        self._manifest.status = "complete"
                        self._write_manifest()
                    return
        except BaseException as exc:  # handed to the capturing thread, which raises it
            self._error = exc
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _stage_sample(self, sample: CapturedSample) -> None:
        structure, tensors = flatten_sample(sample.kwargs)
        names: dict[str, str] = {}
        for path, tensor in tensors.items():
            digest = self._digest(tensor)
            names[path] = digest
            if digest not in self._shard.tensors and digest not in self._prompt_tensors:
                self._prompt_tensors[digest] = tensor.contiguous()
                self._prompt_keys[digest] = path
            self._prompt_raw_bytes += tensor.numel() * tensor.element_size()
        self._prompt_samples.append(
            {
                "prompt": sample.prompt_index,
                "step": sample.step,
                "timestep": sample.timestep,
                "structure": self._shard.structure_index(structure),
                "tensors": names,
            }
        )
        self._extend_schema(structure, tensors)

    def _digest(self, tensor: torch.Tensor) -> str:
        # The capture hook hands the same CPU copy again for an input that did not change between
        # steps; holding the tensor in the memo keeps its id from being reused within the prompt.
        memo = self._digest_memo.get(id(tensor))
        if memo is not None and memo[0] is tensor:
            return memo[1]
        digest = tensor_digest(tensor)
        self._digest_memo[id(tensor)] = (tensor, digest)
        return digest

    def _commit_prompt(self) -> None:
        for record in self._prompt_samples:
            record["id"] = self.progress.samples_written + self._shard.pending_samples()
            self._shard.samples.append(record)
        for digest, tensor in self._prompt_tensors.items():
            self._shard.tensors[digest] = tensor
            self._shard.keys[digest] = self._prompt_keys[digest]
            self._shard.bytes += tensor.numel() * tensor.element_size()
        self._shard.prompts += 1
        self._shard.raw_bytes += self._prompt_raw_bytes
        self._discard_prompt()

    def _discard_prompt(self) -> None:
        self._prompt_samples, self._prompt_tensors, self._digest_memo = [], {}, {}
        self._prompt_keys: dict[str, str] = {}
        self._prompt_raw_bytes = 0

    def _flush_shard(self) -> None:
        """Write the open shard (complete prompts only) and commit it to the manifest."""
        self._discard_prompt()
        shard = self._shard
        if not shard.samples:
            return
        index = len(self._manifest.shards)
        name = shard_name(index, self.shard_format.suffix, self.shard_prefix)
        header = json.dumps({"samples": shard.samples, "structures": shard.structures}, separators=(",", ":"))
        known = self.shard_format.write(self.location, name, shard.tensors, header, shard.keys)
        size, sha256 = known or (self.location.size(name), self.location.sha256(name))
        self._manifest.add_shard(ShardEntry(
            file=name, first_sample=shard.samples[0]["id"], num_samples=len(shard.samples), bytes=size, sha256=sha256,
            first_prompt=shard.samples[0]["prompt"], num_prompts=shard.prompts, tensor_bytes=shard.bytes, raw_bytes=shard.raw_bytes,
        ))
        self._write_manifest()
        self.progress.samples_written = self._manifest.num_samples
        self.progress.bytes_written = self._manifest.stored_bytes
        self._shard = _OpenShard()
        release_freed_memory()

    def _write_manifest(self) -> None:
        self.location.write_json(self.manifest_name, self._manifest.to_json())

    def _extend_schema(self, structure: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        schema = self._manifest.schema
        for path, tensor in tensors.items():
            entry = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
            known = schema.get(path)
            if known is None:
                schema[path] = entry
            elif known.get("shape") != entry["shape"] and known.get("shape") is not None:
                known["shape"] = None  # varies between samples
                known["varies"] = True
        for path, value in constant_leaves(structure).items():
            known = schema.get(path)
            if known is None:
                schema[path] = {"const": value}
            elif "const" in known and known["const"] != value:
                schema[path] = {"const": None, "varies": True}


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A closed shard's tensors are freed, but glibc keeps the pages in its arenas, so without this
    RSS creeps up with every shard and memory no longer looks flat in the prompt count.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


class _OpenShard:
    """The shard being filled: unique tensors by digest, sample records, structures."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}
        self.samples: list[dict[str, Any]] = []
        self.structures: list[dict[str, Any]] = []
        self.bytes = 0
        self.raw_bytes = 0
        self.prompts = 0

    def pending_samples(self) -> int:
        return len(self.samples)

    def structure_index(self, structure: dict[str, Any]) -> int:
        for index, known in enumerate(self.structures):
            if known == structure:
                return index
        self.structures.append(structure)
        return len(self.structures) - 1
