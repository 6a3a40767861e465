"""Original checkpoint key names: the inverse of diffusers' single-file converters.

Runtimes that load "single-file" checkpoints (ComfyUI, diffusers' `from_single_file`, BFL's own
code) use the key names of the original training code, which diffusers renames on load in
`diffusers/loaders/single_file_utils.py`. `original_key_map(family, keys)` inverts those
converters for a model's diffusers state-dict keys:

- `flux`: inverse of `convert_flux_transformer_checkpoint_to_diffusers` (BFL names:
  `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer.adaLN_modulation.1`, ...).
  Three groups are fused: `img_attn.qkv` <- attn.to_q/to_k/to_v, `txt_attn.qkv` <-
  attn.add_q_proj/add_k_proj/add_v_proj, `linear1` <- attn.to_q/to_k/to_v + proj_mlp (stacked
  along the output dim, in that order); `final_layer.adaLN_modulation.1` is `norm_out.linear`
  with its two row halves swapped (BFL shift, scale; diffusers scale, shift).
- `sdxl`, `sd15`, `sd21`: inverse of `convert_ldm_unet_checkpoint` (LDM names: `input_blocks.N.M`,
  `middle_block.N`, `output_blocks.N.M`, `time_embed.0`, `label_emb.0.0`, resnet `in_layers.2`,
  `emb_layers.1`, `skip_connection`, ...). Block indices follow from `layers_per_block`, read off
  the keys (the number of resnets in `down_blocks.0`), and an up block's upsampler is
  `output_blocks.N.2.conv` when the block has attentions, `.1.conv` otherwise. No key is fused.

Keys are written without a prefix (a "diffusion model" file); diffusers' UNet converter expects
`model.diffusion_model.` in front, which `KeyMap.prefix` adds.

Example:
    >>> km = original_key_map("flux", ["transformer_blocks.0.attn.to_q.weight", "proj_out.weight"])
    >>> km.param_key("proj_out.weight"), km.fused_of("transformer_blocks.0.attn.to_q")
    ('final_layer.linear.weight', 'double_blocks.0.img_attn.qkv')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from diffquant.errors import ConfigError

UNET_FAMILIES = ("sdxl", "sd15", "sd21")
KEY_FAMILIES = ("flux", *UNET_FAMILIES)


@dataclass
class KeyMap:
    """diffusers -> original names for one model.

    params: diffusers parameter key -> original key, for every key that is not part of a fused
    group; fused: original module -> the diffusers modules stacked into it (in order); swapped:
    original module -> diffusers module whose two row halves are exchanged.
    """

    params: dict[str, str]
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    swapped: dict[str, str] = field(default_factory=dict)
    prefix: str = ""

    def param_key(self, key: str) -> str:
        if key not in self.params:
            raise ConfigError(f"tensor {key} has no original key name", "export a checkpoint of a supported model family")
        return self.prefix + self.params[key]

    def module_key(self, module: str) -> str:
        """Original name of an unfused diffusers module (its `weight` and `bias` follow it)."""
        return self.param_key(f"{module}.weight")[: -len(".weight")]

    def fused_of(self, module: str) -> str | None:
        """The original fused module that `module` is a part of, or None."""
        for target, parts in self.fused.items():
            if module in parts:
                return self.prefix + target
        return None

    def to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A float diffusers state dict under original names (fused groups stacked, halves swapped)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key in self.params:
                out[self.prefix + self.params[key]] = value
        for target, parts in self.fused.items():
            for suffix in ("weight", "bias"):
                pieces = [state_dict[f"{part}.{suffix}"] for part in parts if f"{part}.{suffix}" in state_dict]
                if pieces:
                    out[f"{self.prefix}{target}.{suffix}"] = torch.cat(pieces, dim=0)
        for target, module in self.swapped.items():
            for suffix in ("weight", "bias"):
                if f"{module}.{suffix}" in state_dict:
                    out[f"{self.prefix}{target}.{suffix}"] = swap_halves(state_dict[f"{module}.{suffix}"])
        return out


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves of dim 0 (its own inverse): BFL's shift/scale vs diffusers' scale/shift."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def original_key_map(family: str, keys: Iterable[str]) -> KeyMap:
    """The inverse key map for a model of `family` whose diffusers state dict has `keys`."""
    keys = list(keys)
    if family == "flux":
        return _flux_map(keys)
    if family in UNET_FAMILIES:
        return _unet_map(keys)
    raise ConfigError(
        f"model family {family!r} has no original key names here",
        f"export a checkpoint of one of {', '.join(KEY_FAMILIES)}",
    )


# Flux (BFL) -------------------------------------------------------------------------------------

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_FLUX_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def _flux_map(keys: list[str]) -> KeyMap:
    params: dict[str, str] = {}
    fused: dict[str, tuple[str, ...]] = {}
    doubles = sorted({int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    singles = sorted({int(m.group(1)) for k in keys if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for diffusers, original in _FLUX_TOP.items():
        for suffix in ("weight", "bias"):
            params[f"{diffusers}.{suffix}"] = f"{original}.{suffix}"
    for i in doubles:
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for diffusers, original in _FLUX_DOUBLE.items():
            for suffix in ("weight", "bias"):
                params[f"{d}{diffusers}.{suffix}"] = f"{o}{original}.{suffix}"
        params.update({d + k: o + v for k, v in _FLUX_DOUBLE_NORMS.items()})
        fused[f"{o}img_attn.qkv"] = tuple(f"{d}attn.{p}" for p in ("to_q", "to_k", "to_v"))
        fused[f"{o}txt_attn.qkv"] = tuple(f"{d}attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))
    for i in singles:
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for diffusers, original in _FLUX_SINGLE.items():
            for suffix in ("weight", "bias"):
                params[f"{d}{diffusers}.{suffix}"] = f"{o}{original}.{suffix}"
        params.update({d + k: o + v for k, v in _FLUX_SINGLE_NORMS.items()})
        fused[f"{o}linear1"] = (f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp")
    return KeyMap(params, fused, {"final_layer.adaLN_modulation.1": "norm_out.linear"})


# UNet (LDM) -------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip


def _unet_map(keys: list[str]) -> KeyMap:
    resnets0 = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not resnets0:
        raise ConfigError("the checkpoint has no down_blocks.0.resnets: it is not a UNet", "export a UNet checkpoint")
    per_block = len(resnets0) + 1  # layers_per_block resnets (and attentions) plus the downsampler
    up_with_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    params = {key: _unet_key(key, per_block, up_with_attn) for key in keys}
    return KeyMap(params)


def _unet_key(key: str, per_block: int, up_with_attn: set[int]) -> str:
    module, _, suffix = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{suffix}"
    if key == "class_embedding.weight":
        return "label_emb.weight"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 + int(m.group(1)) * per_block + int(m.group(3))
        return _block_part("input_blocks", index, m.group(2), m.group(4))
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m.group(1)) + 1) * per_block}.0.op.{m.group(2)}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = 1 if m.group(1) == "attentions" else 2 * int(m.group(2))
        return _block_part("middle_block", index, m.group(1), m.group(3), sub=False)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        index = int(m.group(1)) * per_block + int(m.group(3))
        return _block_part("output_blocks", index, m.group(2), m.group(4))
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m.group(1))
        slot = 2 if block in up_with_attn else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{m.group(2)}"
    raise ConfigError(f"tensor {key} has no LDM key name", "export a checkpoint of a standard SD/SDXL UNet")


def _block_part(blocks: str, index: int, kind: str, rest: str, sub: bool = True) -> str:
    slot = "" if not sub else (".0" if kind == "resnets" else ".1")
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        rest = f"{_RESNET.get(head, head)}.{tail}"
    return f"{blocks}.{index}{slot}.{rest}"


def qkv_groups(layer_names: Iterable[str]) -> list[tuple[str, ...]]:
    """Projections that read the same input and that q/k/v-fusing runtimes load as one matrix.

    Within one attention module: (to_q, to_k, to_v), and (add_q_proj, add_k_proj, add_v_proj);
    in a cross-attention (`attn2` of a UNet transformer block) to_q reads the hidden states and
    to_k / to_v the text, so only (to_k, to_v). This is ModelOpt's grouping for diffusers models
    (`is_qkv_projection`, `get_qkv_group_key`, among modules sharing one input). Groups of one are
    left out.

    Example:
        >>> qkv_groups(["b.attn.to_q", "b.attn.to_k", "b.attn.to_v", "b.attn.to_out.0"])
        [('b.attn.to_q', 'b.attn.to_k', 'b.attn.to_v')]
    """
    names = set(layer_names)
    groups: list[tuple[str, ...]] = []
    parents = sorted({name.rpartition(".")[0] for name in names})
    for parent in parents:
        main = ("to_k", "to_v") if parent.endswith("attn2") else ("to_q", "to_k", "to_v")
        for members in (main, ("add_q_proj", "add_k_proj", "add_v_proj")):
            group = tuple(f"{parent}.{m}" for m in members if f"{parent}.{m}" in names)
            if len(group) > 1:
                groups.append(group)
    return groups
