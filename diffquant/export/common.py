"""What every exporter needs from a checkpoint: its layers, their stored tensors, fused groups.

`read_checkpoint` loads a `diffquant quantize` directory into a `CheckpointContents`: the
manifest, one `LayerRecord` per quantized layer, and every tensor by its diffusers key.
`plain_tensors` are the tensors no quantized layer owns (biases of quantized layers included),
which an exporter renames and copies as they are.

Fused groups. Original checkpoints (BFL's Flux, ComfyUI's Flux) store some projections that
diffusers splits as one matrix: `qkv` (to_q, to_k, to_v stacked along the output dim) and the
single blocks' `linear1` (to_q, to_k, to_v, proj_mlp). A runtime reads one tensor-wide scale per
such matrix, so the parts must share it. `fuse_group` stacks the parts' stored tensors when they
already share their per-tensor scales (exact: the codes are reused as they are), and otherwise
requantizes: the parts are dequantized (`QuantizedWeight.dequantize`, float32),
stacked, and quantized again with one scale chosen from the stacked tensor by the recipe's own
rule (`choose_fp8_scale`, `choose_qparams_affine`, `nvfp4_global_scale` + `nvfp4_quantize`), and
the error that adds is measured as the SQNR of the requantized weight against the stacked
dequantized parts (`FusedWeight.requant_sqnr_db`, inf when exact). Per-row scales (fp8 or int8
per_channel) stack exactly. Static input scales of the parts (they see the same input) are
equal after calibration; where they differ the largest is kept and the exporter says so.

Example:
    >>> import torch
    >>> sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    inf
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import save_file

from diffquant.artifacts.atomic import write_atomic
from diffquant.artifacts.checkpoint import load_checkpoint_tensors, read_checkpoint_manifest
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export.keys import KeyMap, swap_halves
from diffquant.quant.weights import QuantizedWeight
from diffquant.quant.weights.base import scale_in_dtype
from diffquant.quant.formats.affine import choose_qparams_affine, quantize_affine
from diffquant.quant.formats.fp8 import choose_fp8_scale, quantize_fp8
from diffquant.quant.formats.nvfp4 import nvfp4_global_scale, nvfp4_quantize
from diffquant.quant.formats.pack import pack_nibbles
from diffquant.quant.qtypes import get_qtype
from diffquant.quant.spec import TensorSpec

# Names of the input parameters a layer may carry (static activations).
INPUT_SUFFIXES = ("input_scale", "input_zero_point", "input_scale_2")


@dataclass
class CheckpointContents:
    """A checkpoint in memory: manifest, quantized layers by name, all tensors by diffusers key."""

    path: Path
    manifest: dict[str, Any]
    layers: dict[str, LayerRecord]
    tensors: dict[str, torch.Tensor]

    @property
    def recipe(self) -> str:
        return str(self.manifest.get("quantization_config", {}).get("recipe") or self.manifest.get("recipe", {}).get("name", "?"))

    @property
    def family(self) -> str:
        return str(self.manifest.get("model", {}).get("family", ""))

    def owned_keys(self) -> set[str]:
        """Keys of the stored quantized tensors and input parameters (not the biases)."""
        owned: set[str] = set()
        for record in self.layers.values():
            owned.update(record.tensors.values())
            owned.update(record.input_tensors.values())
            if record.svd is not None:
                owned.update(record.svd.tensors.values())
        return owned

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a quantized layer's stored weight, scale or input parameter."""
        owned = self.owned_keys()
        return {key: value for key, value in self.tensors.items() if key not in owned}

    def stored(self, record: LayerRecord) -> dict[str, torch.Tensor]:
        """The layer's stored weight tensors by suffix (`weight` / `weight_packed`, `weight_scale`, ...)."""
        return {suffix: self.tensors[key] for suffix, key in record.tensors.items()}

    def input_params(self, record: LayerRecord) -> dict[str, torch.Tensor]:
        return {suffix: self.tensors[key] for suffix, key in record.input_tensors.items()}

    def dequantized(self, record: LayerRecord, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's dequantized weight in its real shape (float32 arithmetic, then `dtype`)."""
        return QuantizedWeight(TensorSpec(**record.weight), torch.Size(record.shape), self.stored(record)).dequantize(dtype)


def read_checkpoint(checkpoint: Path) -> CheckpointContents:
    """Load and check a checkpoint directory (manifest, records, tensors on the CPU)."""
    manifest = read_checkpoint_manifest(Path(checkpoint))
    records = {record.name: record for record in manifest.layers}
    return CheckpointContents(Path(checkpoint), manifest.to_json(), records, load_checkpoint_tensors(Path(checkpoint)))


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10 log10(sum(ref^2) / sum((ref - approx)^2)) in float64; inf when equal."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class FusedWeight:
    """A stacked weight in diffquant's stored layout (suffix -> tensor), for one fused group."""

    spec: TensorSpec
    shape: tuple[int, ...]
    stored: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    requant_sqnr_db: float = math.inf
    requantized: bool = False


def fuse_group(contents: CheckpointContents, target: str, parts: tuple[str, ...]) -> FusedWeight:
    """Stack the quantized layers `parts` (in order, along the output dim) into one weight.

    All parts must be quantized with the same weight spec and input spec; see the module docstring
    for when the stacking is exact and when it requantizes.
    """
    records = [contents.layers[name] for name in parts]
    specs = {tuple(sorted(record.weight.items())) for record in records}
    inputs = {tuple(sorted((record.input or {}).items())) for record in records}
    if len(specs) != 1 or len(inputs) != 1:
        raise ConfigError(
            f"{target} fuses {', '.join(parts)}, which are quantized with different specs",
            "quantize them with one spec (drop the per-name overrides that split them)",
        )
    spec = TensorSpec(**records[0].weight)
    shape = (sum(record.out_features for record in records), *records[0].shape[1:])
    stored_parts = [contents.stored(record) for record in records]
    fused = FusedWeight(spec, shape, {}, _fused_inputs(contents, records, target))
    if any(record.svd is not None for record in records):
        raise ConfigError(f"{target} fuses SVDQuant layers", "export a recipe without svdquant for this format")
    if _same_tensor_scales(stored_parts, spec):
        fused.stored = {suffix: _stack([part[suffix] for part in stored_parts]) for suffix in stored_parts[0]}
        return fused
    dequantized = torch.cat([contents.dequantized(record).reshape(record.out_features, -1) for record in records], dim=0)
    fused.stored = requantize(dequantized, spec)
    fused.requantized = True
    approx = QuantizedWeight(spec, torch.Size(shape), fused.stored).dequantize(torch.float32).reshape(shape[0], -1)
    fused.requant_sqnr_db = sqnr_db(dequantized, approx)
    return fused


def requantize(w2: torch.Tensor, spec: TensorSpec) -> dict[str, torch.Tensor]:
    """Quantize float32 rows [out, K] with one tensor-wide scale by the spec's own rule (min_max).

    Only the formats whose fused groups need it: fp8 and int8 per_tensor (symmetric or affine),
    and nvfp4 (its block scales are per row, its `weight_scale_2` shared).
    """
    qtype = get_qtype(spec.dtype)
    if spec.dtype == "nvfp4":
        global_scale = nvfp4_global_scale(w2.abs().amax())
        codes, block_scale = nvfp4_quantize(w2, global_scale)
        return {"weight_packed": pack_nibbles(codes), "weight_scale": block_scale, "weight_scale_2": global_scale.float()}
    if spec.granularity != "per_tensor":
        raise ConfigError(f"requantizing {spec.describe()} with a shared scale is not supported", "use a per_tensor or nvfp4 recipe")
    if qtype.element in ("e4m3", "e5m2"):
        scale = scale_in_dtype(choose_fp8_scale(w2.abs().amax(), qtype.storage_dtype).float(), spec)
        return {"weight": quantize_fp8(w2, scale, qtype.storage_dtype), "weight_scale": scale}
    if qtype.element == "int" and not qtype.packed:
        scale, zero_point = choose_qparams_affine(w2.amin(), w2.amax(), qtype.qmin, qtype.qmax, spec.symmetric, spec.scale_rule)
        scale = scale_in_dtype(scale, spec)
        codes = quantize_affine(w2, scale, None if spec.symmetric else zero_point, qtype.qmin, qtype.qmax)
        stored = {"weight": codes.to(qtype.storage_dtype), "weight_scale": scale.float()}
        if not spec.symmetric:
            stored["weight_zero_point"] = zero_point.to(qtype.storage_dtype)
        return stored
    raise ConfigError(f"requantizing {spec.describe()} with a shared scale is not supported", "use an fp8, int8 or nvfp4 recipe")


def requantize_with_global_scale(w2: torch.Tensor, global_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 rows [out, K] quantized with a given `weight_scale_2` (a group's shared one)."""
    codes, block_scale = nvfp4_quantize(w2, global_scale)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": block_scale, "weight_scale_2": global_scale.float().reshape(())}


def _same_tensor_scales(parts: list[dict[str, torch.Tensor]], spec: TensorSpec) -> bool:
    if spec.granularity != "per_tensor" and spec.dtype != "nvfp4":
        return True  # every scale belongs to one row (per_channel, per_group, mxfp4): stacking is exact
    shared = ("weight_scale_2",) if spec.dtype == "nvfp4" else ("weight_scale", "weight_zero_point")
    for suffix in shared:
        values = [part[suffix] for part in parts if suffix in part]
        if values and not all(torch.equal(values[0], value) for value in values[1:]):
            return False
    return True


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].dim() == 0:
        return tensors[0]  # a per-tensor value the parts share (checked equal)
    return torch.cat(tensors, dim=0)


def _fused_inputs(contents: CheckpointContents, records: list[LayerRecord], target: str) -> dict[str, torch.Tensor]:
    params = [contents.input_params(record) for record in records]
    if not params[0]:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for suffix in params[0]:
        values = [p[suffix] for p in params]
        if suffix == "input_zero_point":
            if not all(torch.equal(values[0], v) for v in values[1:]):
                raise ConfigError(f"{target}: its parts have different input zero points", "use a symmetric input spec")
            merged[suffix] = values[0]
            continue
        merged[suffix] = torch.stack([v.float().reshape(()) for v in values]).amax()
    return merged



@dataclass
class OriginalLayer:
    """A quantized layer under its original checkpoint name: one diffusers layer, or a fused group.

    stored / inputs: diffquant's stored layout (suffix -> tensor) of the whole (stacked) weight;
    record: the (first) part's manifest record, for its type, dtype and input spec.
    """

    key: str
    sources: tuple[str, ...]
    record: LayerRecord
    spec: TensorSpec
    shape: tuple[int, ...]
    stored: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    requant_sqnr_db: float = math.inf


def original_layout(contents: CheckpointContents, keymap: KeyMap) -> tuple[list[OriginalLayer], dict[str, torch.Tensor], list[str]]:
    """The checkpoint under original key names: quantized layers, plain tensors, notes.

    Fused groups are stacked by `fuse_group` (a group must be all quantized or all plain);
    a swapped module gets its row halves exchanged in every per-row tensor.
    """
    for target, parts in keymap.fused.items():
        quantized = [part for part in parts if part in contents.layers]
        if quantized and len(quantized) != len(parts):
            plain = [part for part in parts if part not in contents.layers]
            raise ConfigError(
                f"{keymap.prefix}{target} fuses {', '.join(parts)}, but {', '.join(plain)} are not quantized",
                "quantize all of them or none (the same exclude patterns for the group)",
            )
    notes: list[str] = []
    layers: list[OriginalLayer] = []
    fused_done: set[str] = set()
    for name, record in contents.layers.items():
        target = keymap.fused_of(name)
        if target is not None:
            if target in fused_done:
                continue
            parts = keymap.fused[target[len(keymap.prefix):]]
            fused = fuse_group(contents, target, parts)
            fused_done.add(target)
            if fused.requantized:
                notes.append(f"{target}: requantized with one shared scale, weight SQNR {fused.requant_sqnr_db:.2f} dB vs the parts")
            spread = _input_spread(contents, parts)
            if spread:
                notes.append(f"{target}: parts had different static input scales ({spread}); the largest is used")
            layers.append(OriginalLayer(target, parts, record, fused.spec, fused.shape, fused.stored, fused.inputs, fused.requant_sqnr_db))
            continue
        stored = contents.stored(record)
        swapped = next((t for t, m in keymap.swapped.items() if m == name), None)
        key = keymap.prefix + swapped if swapped is not None else keymap.module_key(name)
        if swapped is not None:
            stored = {s: swap_halves(t) if t.dim() and t.shape[0] == record.out_features else t for s, t in stored.items()}
        layers.append(OriginalLayer(key, (name,), record, TensorSpec(**record.weight), record.shape, stored, contents.input_params(record)))
    quantized_weights = {f"{name}.weight" for name in contents.layers}
    plain = {key: value for key, value in contents.plain_tensors().items() if key not in quantized_weights}
    return layers, keymap.to_original(plain), notes


def _input_spread(contents: CheckpointContents, parts: tuple[str, ...]) -> str:
    values = []
    for part in parts:
        params = contents.input_params(contents.layers[part])
        for suffix in ("input_scale", "input_scale_2"):
            if suffix in params:
                values.append(float(params[suffix]))
    if values and max(values) != min(values):
        return f"{min(values):.6g} .. {max(values):.6g}"
    return ""


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write contiguous CPU tensors to `path` under a temporary name, then publish it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def layer_format(spec: TensorSpec) -> str:
    """A short name of a weight spec for the report's `layers` counts (e.g. `nvfp4`, `fp8_e4m3/per_tensor`)."""
    return spec.dtype if spec.dtype in ("nvfp4", "mxfp4") else f"{spec.dtype}/{spec.granularity}"
