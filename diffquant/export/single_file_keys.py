"""Original checkpoint key names: the inverse of diffusers' single-file converters.

diffusers' `from_single_file` reads a model's original (BFL / Stability) state dict and renames it
with a converter in `diffusers/loaders/single_file_utils.py`; ComfyUI and ComfyUI-GGUF read the
original names directly. `original_layout(family, keys)` gives, for a diffusers state dict's keys,
the original tensors and the diffusers tensors each is made of, in order: fused tensors are the
concatenation of their parts along dim 0 (Flux's `img_attn.qkv` = to_q, to_k, to_v; a single
block's `linear1` = to_q, to_k, to_v, proj_mlp), and `swap_halves` marks a tensor whose two halves
along dim 0 the converter swaps (Flux's `final_layer.adaLN_modulation.1`: shift, scale in the
original, scale, shift in diffusers). The round trip through diffusers' own converter is tested.

Families with an inverse map: flux (`convert_flux_transformer_checkpoint_to_diffusers`). Others
return None: their exporters keep the diffusers names, which `from_single_file` loads unconverted
(it skips the converter when the keys already match the model).

Example:
    >>> layout = original_layout("flux", ["transformer_blocks.0.attn.to_q.weight",
    ...     "transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.attn.to_v.weight"])
    >>> layout[0].name, layout[0].parts[1]
    ('double_blocks.0.img_attn.qkv.weight', 'transformer_blocks.0.attn.to_k.weight')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffquant.errors import ConfigError


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the original checkpoint: its name, the diffusers tensors concatenated along
    dim 0 to make it, and whether its two halves along dim 0 are swapped."""

    name: str
    parts: tuple[str, ...]
    swap_halves: bool = False


# diffusers module (regex over the key without `.weight` / `.bias`) -> (original module, part index).
_FLUX_MODULES: list[tuple[str, str, int]] = [
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0),
    (r"context_embedder", "txt_in", 0),
    (r"x_embedder", "img_in", 0),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin", 0),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_q", r"double_blocks.\1.img_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", r"double_blocks.\1.img_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", r"double_blocks.\1.img_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm", 0),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm", 0),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm", 0),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm", 0),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", r"single_blocks.\1.linear1", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", r"single_blocks.\1.linear1", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", r"single_blocks.\1.linear1", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1", 3),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q", r"single_blocks.\1.norm.query_norm", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k", r"single_blocks.\1.norm.key_norm", 0),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2", 0),
    (r"proj_out", "final_layer.linear", 0),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", 0),
]
_FLUX_SWAPPED = {"final_layer.adaLN_modulation.1"}
# Norm weights are called `scale` in BFL's code.
_FLUX_PARAM_RENAMES = {"query_norm": "scale", "key_norm": "scale"}


def original_layout(family: str, keys: list[str]) -> list[OriginalTensor] | None:
    """The original tensors of a diffusers state dict (see the module docstring), or None when
    `family` has no inverse map here. ConfigError for a key the map does not know."""
    if family != "flux":
        return None
    groups: dict[str, dict[int, str]] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        original = _flux_module(module)
        if original is None:
            raise ConfigError(f"tensor {key} has no original Flux name", "export with names='diffusers'")
        name, part = original
        leaf = name.rsplit(".", 1)[-1]
        param = _FLUX_PARAM_RENAMES.get(leaf, param)
        groups.setdefault(f"{name}.{param}", {})[part] = key
    layout = []
    for name, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise ConfigError(f"original tensor {name} misses parts ({sorted(parts)} of a fused group)", "export with names='diffusers'")
        module = name.rsplit(".", 1)[0]
        layout.append(OriginalTensor(name, tuple(parts[i] for i in range(len(parts))), module in _FLUX_SWAPPED))
    return layout


def _flux_module(module: str) -> tuple[str, int] | None:
    for pattern, original, part in _FLUX_MODULES:
        match = re.fullmatch(pattern, module)
        if match:
            return match.expand(original), part
    return None
