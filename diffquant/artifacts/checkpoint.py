"""The quantized checkpoint: `model.safetensors` plus `quant_manifest.json` (format in README.md).

`model.safetensors` is the state dict of the quantized submodule: quantized layers contribute their
stored low-precision tensors (int8 / float8 / packed uint8 codes, float32 or E8M0 / E4M3 scales,
zero points, SVDQuant branches), every other parameter keeps its original name and dtype. The
manifest lists every quantized layer (type, shape, specs, the names of its tensors, frozen input
parameters, quality figures) and every skipped one, the recipe, the model, and the calibration
artifact it came from. Both files are written under temporary names and renamed when complete;
the manifest, written last, is the commit point. Replacing a checkpoint (`--overwrite`) builds the
new one beside the old and switches the directory in one rename (`replace.py`), so a kill at any
instant leaves the old checkpoint or the new one, each whole.

Reading checks the manifest field by field, that every tensor it names is in the weights' header,
and (by default) the weights' sha256, streamed once per file and process (`verify_checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffquant import __version__
from diffquant.artifacts.atomic import PARTIAL_SUFFIX, partial_path, publish, write_json_atomic
from diffquant.artifacts.calibration_format import file_sha256, json_sha256
from diffquant.artifacts.checkpoint_records import CheckpointManifest, check_checkpoint_format
from diffquant.artifacts.replace import recover_switch, staging_dir, switch_directory
from diffquant.errors import ArtifactError

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "quant_manifest.json"
CHECKPOINT_FILES = frozenset({WEIGHTS_NAME, MANIFEST_NAME, WEIGHTS_NAME + PARTIAL_SUFFIX, MANIFEST_NAME + PARTIAL_SUFFIX})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RERUN = "re-run `diffquant quantize` into a new --out"


def default_checkpoint_dir(root: Path, model_name: str, recipe_name: str, calibration_sha256: str, recipe_source: dict[str, Any]) -> Path:
    """<root>/quantized/<model>-<recipe>-<short hash of the calibration and the recipe>."""
    key = json_sha256({"calibration": calibration_sha256, "recipe": recipe_source})[:8]
    return root / "quantized" / f"{model_name}-{recipe_name}-{key}"


def prepare_checkpoint_dir(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse one that already holds a checkpoint unless `overwrite`, and refuse to
    replace files diffquant did not write (a `model.safetensors` without a checkpoint manifest).

    An existing checkpoint is left in place: `write_checkpoint` builds the new one beside it and
    switches it in only once it is complete, so a run that fails keeps the previous checkpoint.
    Call under the output's `OutputLock`.
    """
    try:
        recover_switch(out, CHECKPOINT_FILES)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out") from exc
    existing = [name for name in (WEIGHTS_NAME, MANIFEST_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise ArtifactError(f"{out} already holds a quantized checkpoint ({', '.join(existing)})", "choose another --out, or pass --overwrite")
    if existing and not (out / MANIFEST_NAME).is_file():
        raise ArtifactError(f"{out} holds a {WEIGHTS_NAME} but no {MANIFEST_NAME}, so diffquant did not write it and will not replace it",
                            "choose another --out")


def write_checkpoint(out: Path, state_dict: dict[str, torch.Tensor], manifest: CheckpointManifest) -> CheckpointManifest:
    """Write the weights, then the manifest (with the weights' sha256 and size); returns the manifest written.

    Into a directory with a checkpoint, both are written into `staging_dir(out)` and switched in
    with one rename; the old files go only after. A full disk or any write error leaves the old
    checkpoint and is one line."""
    replacing = (out / MANIFEST_NAME).is_file()
    directory = staging_dir(out) if replacing else out
    try:
        if replacing:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        manifest = _write_files(directory, state_dict, manifest)
        if replacing:
            _publish_step("switch")
            switch_directory(directory, out, CHECKPOINT_FILES)
    except OSError as exc:
        for name in (WEIGHTS_NAME + PARTIAL_SUFFIX, MANIFEST_NAME + PARTIAL_SUFFIX):
            (out / name).unlink(missing_ok=True)
        if replacing:
            shutil.rmtree(directory, ignore_errors=True)
        full = exc.errno == errno.ENOSPC
        raise ArtifactError(
            f"writing the checkpoint into {out} failed ({exc.strerror or exc})" + ("; the previous checkpoint is kept" if replacing else ""),
            "free disk space and re-run" if full else "check the directory's permissions and free space, then re-run",
        ) from exc
    return manifest


def _write_files(out: Path, state_dict: dict[str, torch.Tensor], manifest: CheckpointManifest) -> CheckpointManifest:
    started = time.perf_counter()
    tensors = _unshared(state_dict)
    final = out / WEIGHTS_NAME
    tmp = partial_path(final)
    metadata = {
        "format": "pt",
        "diffquant_version": __version__,
        "quantization_config": json.dumps(manifest.quantization_config, sort_keys=True),
        "calibration": json.dumps(manifest.calibration, sort_keys=True),
    }
    save_file(tensors, str(tmp), metadata=metadata)
    sort_header_metadata(tmp)
    _publish_step("weights")
    publish(tmp, final)
    sizes = dict(manifest.sizes, checkpoint_bytes=final.stat().st_size)
    if sizes.get("fp16_bytes"):
        sizes["ratio_vs_fp16"] = sizes["checkpoint_bytes"] / sizes["fp16_bytes"]
    files = {WEIGHTS_NAME: {"bytes": final.stat().st_size, "sha256": file_sha256(final)}}
    timing = manifest.timing
    if isinstance(timing, dict) and isinstance(timing.get("phases_seconds"), dict):
        # The write phase of a run: the weights written, synced and hashed (the manifest follows).
        timing = {**timing, "phases_seconds": {**timing["phases_seconds"], "write": round(time.perf_counter() - started, 3)}}
    manifest = manifest.replace(sizes=sizes, files=files, timing=timing)
    _publish_step("manifest")
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def _publish_step(step: str) -> None:
    """A named point of the publish step; tests kill the process here (a no-op otherwise)."""


def read_checkpoint_manifest(directory: Path, verify: bool | None = None) -> CheckpointManifest:
    """The checked manifest of a checkpoint, as a record (the checks of `read_checkpoint_json`)."""
    return CheckpointManifest.from_json(read_checkpoint_json(directory, verify), str(Path(directory) / MANIFEST_NAME))


def read_checkpoint_json(directory: Path, verify: bool | None = None, fields: bool = True) -> dict[str, Any]:
    """Load and check `quant_manifest.json` as JSON (its fields, parsed by `CheckpointManifest`;
    the presence, size and header of its weights file; and, unless `verify` is False or
    verification is switched off, their sha256). With `fields=False` only the manifest's format
    and its `files` record are checked."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST_NAME}", "pass a directory written by `diffquant quantize`")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", _RERUN) from exc
    check_checkpoint_format(manifest, str(path))
    _check_files_record(path, manifest)
    if fields:
        CheckpointManifest.from_json(manifest, str(path))
    weights = Path(directory) / WEIGHTS_NAME
    expected = manifest["files"][WEIGHTS_NAME]["bytes"]
    if weights.is_symlink() or not weights.is_file() or weights.stat().st_size != expected:
        raise ArtifactError(f"checkpoint weights {weights} are missing or truncated", "re-run `diffquant quantize`")
    if fields:
        _check_header(weights, manifest)
    if verify if verify is not None else _VERIFY.enabled:
        problems = verify_checkpoint_files(directory, manifest["files"])
        if problems:
            raise ArtifactError(problems[0], "the checkpoint was changed after it was written; re-run `diffquant quantize`, or pass --no-verify")
    return manifest


def verify_checkpoint_files(directory: Path, files: dict[str, Any] | None = None) -> list[str]:
    """One line per file of the checkpoint whose sha256 differs from the manifest's `files` record
    (empty: all match). Each file is hashed streamed, once per process for the same file state
    (path, inode, size, mtime)."""
    files = files if files is not None else read_checkpoint_json(directory, verify=False, fields=False)["files"]
    problems = []
    for name, record in files.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"checkpoint file {path} is missing")
        elif _cached_sha256(path) != record["sha256"]:
            problems.append(f"checkpoint file {path} fails its sha256 check (the manifest records {record['sha256'][:16]}...)")
    return problems


class _Verification(threading.local):
    enabled = True


_VERIFY = _Verification()
_HASHED: dict[tuple[str, int, int, int], str] = {}


@contextlib.contextmanager
def checkpoint_verification(enabled: bool) -> Iterator[None]:
    """Within the block, `read_checkpoint_manifest` checks weights' sha256 only if `enabled`
    (`--no-verify` of the commands that load checkpoints)."""
    previous, _VERIFY.enabled = _VERIFY.enabled, enabled
    try:
        yield
    finally:
        _VERIFY.enabled = previous


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def _bad(path: Path, field: str, value: Any, allowed: str) -> ArtifactError:
    return ArtifactError(f"{path}: {field} is {_short(value)}, allowed is {allowed}", _RERUN)


def _check_files_record(path: Path, manifest: dict[str, Any]) -> None:
    """The `files` record: exactly the weights file, with an integer size and a sha256."""
    def bad(field: str, value: Any, allowed: str) -> ArtifactError:
        return _bad(path, field, value, allowed)

    files = manifest.get("files")
    record = files.get(WEIGHTS_NAME) if isinstance(files, dict) else None
    if not isinstance(files, dict) or set(files) != {WEIGHTS_NAME} or not isinstance(record, dict):
        raise bad("files", files, f"{{{WEIGHTS_NAME!r}: {{bytes, sha256}}}}")
    if not isinstance(record.get("bytes"), int) or isinstance(record.get("bytes"), bool) or record["bytes"] < 0:
        raise bad(f"files.{WEIGHTS_NAME}.bytes", record.get("bytes"), "an integer >= 0")
    if not isinstance(record.get("sha256"), str) or not _SHA256.match(record["sha256"]):
        raise bad(f"files.{WEIGHTS_NAME}.sha256", record.get("sha256"), "64 lowercase hex digits")


def _check_header(weights: Path, manifest: dict[str, Any]) -> None:
    """The weights file must parse, and hold every tensor the manifest names."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"checkpoint weights {weights} cannot be read ({exc})", _RERUN) from exc
    for layer in manifest["layers"]:
        wanted = [*layer["tensors"].values(), *(layer.get("input_tensors") or {}).values()]
        missing = [name for name in wanted if name not in names]
        if missing:
            raise ArtifactError(f"checkpoint weights {weights} lack tensor {missing[0]} of layer {layer['name']}", _RERUN)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_checkpoint_tensors(directory: Path, device: str | torch.device = "cpu", verify: bool | None = None) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` (memory-mapped, then moved to `device`), after the
    checks of `read_checkpoint_json` (the sha256 is computed once per file state)."""
    read_checkpoint_json(directory, verify, fields=False)
    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt", device=str(device)) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its `__metadata__` keys sorted, in place.

    safetensors writes metadata keys in hash-map order, which changes from call to call; sorting
    makes identical checkpoints byte-identical. The header keeps its length (padded with spaces,
    as the format allows), so no tensor offset moves.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) > length:
            return  # cannot happen for the same content; keep the file as written
        handle.seek(8)
        handle.write(encoded + b" " * (length - len(encoded)))


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning any that share storage (safetensors refuses shared ones)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = tensor.untyped_storage().data_ptr()
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor
    return out
