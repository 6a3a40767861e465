"""The quantized checkpoint: `model.safetensors` plus `quant_manifest.json` (format in README.md).

`model.safetensors` is the state dict of the quantized submodule: quantized layers contribute their
stored low-precision tensors (int8 / float8 / packed uint8 codes, float32 or E8M0 / E4M3 scales,
zero points, SVDQuant branches), every other parameter keeps its original name and dtype. The
manifest lists every quantized layer (type, shape, specs, the names of its tensors, frozen input
parameters, quality figures) and every skipped one, the recipe, the model, and the calibration
artifact it came from. Both files are written under temporary names and renamed when complete;
the manifest, written last, is the commit point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffquant import __version__
from diffquant.artifacts.atomic import partial_path, publish, write_json_atomic
from diffquant.artifacts.calibration_format import file_sha256
from diffquant.errors import ArtifactError

CHECKPOINT_FORMAT = "diffquant-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "quant_manifest.json"


def prepare_checkpoint_dir(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse one that already holds a checkpoint unless `overwrite`.

    An existing checkpoint is left in place: `write_checkpoint` replaces it only once the new one
    is written, so a run that fails keeps the previous checkpoint.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out") from exc
    existing = [name for name in (WEIGHTS_NAME, MANIFEST_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise ArtifactError(f"{out} already holds a quantized checkpoint ({', '.join(existing)})", "choose another --out, or pass --overwrite")


def write_checkpoint(out: Path, state_dict: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the weights, then the manifest (with the weights' sha256 and size); returns the manifest."""
    tensors = _unshared(state_dict)
    final = out / WEIGHTS_NAME
    tmp = partial_path(final)
    metadata = {
        "format": "pt",
        "diffquant_version": __version__,
        "quantization_config": json.dumps(manifest["quantization_config"], sort_keys=True),
        "calibration": json.dumps(manifest.get("calibration", {}), sort_keys=True),
    }
    save_file(tensors, str(tmp), metadata=metadata)
    sort_header_metadata(tmp)
    # The old manifest goes first: without it the directory no longer claims a checkpoint while
    # the new weights replace the old ones.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    publish(tmp, final)
    sizes = dict(manifest.get("sizes", {}), checkpoint_bytes=final.stat().st_size)
    if sizes.get("fp16_bytes"):
        sizes["ratio_vs_fp16"] = sizes["checkpoint_bytes"] / sizes["fp16_bytes"]
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **manifest,
        "sizes": sizes,
        "files": {WEIGHTS_NAME: {"bytes": final.stat().st_size, "sha256": file_sha256(final)}},
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def read_checkpoint_manifest(directory: Path) -> dict[str, Any]:
    """Load and check `quant_manifest.json` and the presence and size of its weights file."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST_NAME}", "pass a directory written by `diffquant quantize`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("version") != CHECKPOINT_VERSION:
        raise ArtifactError(
            f"{path} is not a diffquant checkpoint manifest of version {CHECKPOINT_VERSION}",
            "re-quantize with this diffquant version",
        )
    weights = Path(directory) / WEIGHTS_NAME
    expected = manifest["files"][WEIGHTS_NAME]["bytes"]
    if not weights.is_file() or weights.stat().st_size != expected:
        raise ArtifactError(f"checkpoint weights {weights} are missing or truncated", "re-run `diffquant quantize`")
    return manifest


def load_checkpoint_tensors(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` (memory-mapped, then moved to `device`)."""
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
