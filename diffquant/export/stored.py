"""A quantized checkpoint as the GGUF / Quark / torchao / Nunchaku exporters read it.

`StoredCheckpoint` holds the manifest, one `LayerRecord` per quantized layer and every stored
tensor. It gives a layer's stored tensors by suffix, its dequantized weight (through
`diffquant.quant.weights.QuantizedWeight.dequantize`, the one place that knows every format), and the
integer codes of an INT4 / INT8 layer unpacked from the documented layout (artifacts/README.md:
byte = code[2k] | code[2k+1] << 4, signed INT4 as two's-complement nibbles). `refuse_inputs` and
`refuse_svd` are the one-line refusals a layout without activation quantization or without a
low-rank branch gives.

Example:
    >>> nibbles = torch.tensor([[0x8F, 0x07]], dtype=torch.uint8)
    >>> unpack_int4(nibbles, signed=True).tolist()
    [[-1, -8, 7, 0]]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.checkpoint import load_checkpoint_tensors, read_checkpoint_manifest
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError


@dataclass(frozen=True)
class StoredCheckpoint:
    """manifest: quant_manifest.json; layers: its quantized layers; tensors: model.safetensors."""

    path: Path
    manifest: dict[str, Any]
    layers: list[LayerRecord]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def read(cls, checkpoint: Path) -> "StoredCheckpoint":
        manifest = read_checkpoint_manifest(Path(checkpoint))
        return cls(Path(checkpoint), manifest.to_json(), list(manifest.layers), load_checkpoint_tensors(Path(checkpoint)))

    @property
    def recipe_name(self) -> str:
        return str((self.manifest.get("recipe") or {}).get("name", "?"))

    @property
    def family(self) -> str:
        return str(self.manifest["model"].get("family", ""))

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["model"].get("torch_dtype") or "float32")

    def stored(self, record: LayerRecord) -> dict[str, torch.Tensor]:
        """The layer's weight tensors by suffix (`weight` / `weight_packed`, `weight_scale`, ...)."""
        return {suffix: self.tensors[key] for suffix, key in record.tensors.items()}

    def dequantized(self, record: LayerRecord, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's dequantized weight in its real shape, as diffquant computes it."""
        from diffquant.quant.spec import TensorSpec
        from diffquant.quant.weights import QuantizedWeight

        return QuantizedWeight(TensorSpec(**record.weight), torch.Size(record.shape), self.stored(record)).dequantize(dtype)

    def int_codes(self, record: LayerRecord) -> torch.Tensor:
        """INT4 / UINT4 / INT8 / UINT8 codes as int16 [out, K] (int4 unpacked, signed where signed)."""
        stored = self.stored(record)
        dtype = record.weight["dtype"]
        if dtype in ("int4", "uint4"):
            return unpack_int4(stored["weight_packed"], signed=dtype == "int4").to(torch.int16)
        if dtype in ("int8", "uint8"):
            return stored["weight"].reshape(record.out_features, -1).to(torch.int16)
        raise ValueError(f"layer {record.name} stores {dtype}, not integer codes")

    def scale_per_column(self, record: LayerRecord, name: str = "weight_scale") -> torch.Tensor:
        """A first-level scale or zero point broadcast to float32 [out, K] (one value per weight)."""
        value = self.stored(record)[name].float()
        out, k = record.out_features, record.in_features
        if value.dim() == 0:
            return value.expand(out, k)
        return value.repeat_interleave(k // value.shape[1], dim=1) if value.shape[1] != k else value


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K]: low nibble is the even index; signed: two's complement."""
    low = packed & 0x0F
    high = packed >> 4
    codes = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)
    return torch.where(codes > 7, codes - 16, codes) if signed else codes


def refuse_inputs(checkpoint: StoredCheckpoint, fmt: str, fits: str) -> None:
    """ConfigError when any layer quantizes its inputs (static or dynamic): `fmt` is weight-only."""
    for record in checkpoint.layers:
        if record.input is not None:
            kind = "dynamic" if record.input.get("dynamic") else "static input scales"
            raise ConfigError(
                f"{fmt} is weight-only, but recipe {checkpoint.recipe_name} quantizes layer {record.name}'s inputs ({kind} {record.input['dtype']})",
                f"quantize with a weight-only recipe such as {fits}",
            )


def refuse_svd(checkpoint: StoredCheckpoint, fmt: str, fits: str) -> None:
    """ConfigError when any layer has an SVDQuant smoothing + low-rank branch `fmt` cannot hold."""
    for record in checkpoint.layers:
        if record.svd is not None:
            raise ConfigError(
                f"{fmt} has no low-rank branch or smoothing, but recipe {checkpoint.recipe_name} gives layer {record.name} an SVDQuant rank-{record.svd.rank} branch",
                f"quantize with a recipe without svdquant such as {fits}, or export to nunchaku-lite",
            )


def component_config(source: StoredCheckpoint, config: Path | None = None) -> dict[str, Any]:
    """The quantized component's diffusers `config.json` (from `config`, a folder or file, or else
    from the checkpoint's model source), for exporters that write a component folder."""
    if config is None:
        from diffquant.models.loading import resolve_source
        from diffquant.models.presets import resolve_model

        model = source.manifest["model"]
        local = Path(str(model.get("source", ""))).is_dir()
        root = Path(resolve_source(resolve_model(model["source"] if local else model["name"], model.get("target"))))
        config = root / model["target"]
    path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
    if not path.is_file():
        raise ConfigError(f"no model config at {path}", "pass config= the folder holding the component's config.json")
    return json.loads(path.read_text())
