"""Shared-input groups: layers that read one input and that runtimes load as one fused matrix.

A runtime that fuses q/k/v (ModelOpt's diffusers export, SGLang, vLLM, nunchaku's `qkv_proj`) or
a Flux single block's `linear1` (BFL, ComfyUI) reads one tensor-wide weight scale, one static
input scale and, for SVDQuant, one smoothing factor and one low-rank down-projection per fused
matrix. The recipe key `share_groups` makes the quantizer choose them once per group, so the
export stacks the parts exactly instead of requantizing them:

| share_groups | groups (within one module, in this order) |
|---|---|
| none (default) | none: every layer chooses its own scales |
| qkv | (to_q, to_k, to_v) and (add_q_proj, add_k_proj, add_v_proj); in a UNet cross-attention (`attn2`) to_q reads the image and to_k / to_v the text, so only (to_k, to_v). ModelOpt's grouping (`is_qkv_projection`, `get_qkv_group_key` among modules that share an input) |
| fused | qkv, except that a Flux single block's (attn.to_q, attn.to_k, attn.to_v, proj_mlp) is one group: BFL's `linear1` |

What a group shares (the quantizer, `quantizer.SharedGroup`): for SVDQuant, the smoothing factor
s_j = max|X_j|^alpha / max_i|W_ij|^(1-alpha) over the stacked weight's rows (the parts see the same
X) and one SVD of the stacked smoothed weight: the parts keep the same `lora_down` and their rows
of `lora_up` and of the residual, so stacking them gives exactly the fused layer's rank-r branch;
the weight range of a per-tensor or NVFP4 weight, observed over the stacked (residual) weight, so
the parts store one `weight_scale` / `weight_scale_2`; a static input scale, which is the same for
parts that read the same input (and, with one smoothing factor, the same smoothed input).

Example:
    >>> shared_input_groups(["b.attn.to_q", "b.attn.to_k", "b.attn.to_v", "b.proj_mlp"], "fused")
    [('b.attn.to_q', 'b.attn.to_k', 'b.attn.to_v', 'b.proj_mlp')]
    >>> shared_input_groups(["u.attn2.to_q", "u.attn2.to_k", "u.attn2.to_v"], "qkv")
    [('u.attn2.to_k', 'u.attn2.to_v')]
"""

from __future__ import annotations

from typing import Iterable

SHARE_MODES = ("none", "qkv", "fused")
QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def shared_input_groups(layer_names: Iterable[str], mode: str) -> list[tuple[str, ...]]:
    """The groups of `layer_names` under `mode` (see the module docstring); groups of one are left out."""
    if mode not in SHARE_MODES:
        raise ValueError(f"share_groups mode {mode!r} is not one of {SHARE_MODES}")
    if mode == "none":
        return []
    names = set(layer_names)
    groups: list[tuple[str, ...]] = []
    taken: set[str] = set()
    if mode == "fused":
        for name in sorted(names):
            block, _, leaf = name.rpartition(".")
            if leaf != "proj_mlp":
                continue
            group = tuple(f"{block}.attn.{m}" for m in QKV if f"{block}.attn.{m}" in names) + (name,)
            if len(group) == 4:
                groups.append(group)
                taken.update(group)
    for parent in sorted({name.rpartition(".")[0] for name in names}):
        main = QKV[1:] if parent.endswith("attn2") else QKV
        for members in (main, ADDED_QKV):
            group = tuple(f"{parent}.{m}" for m in members if f"{parent}.{m}" in names and f"{parent}.{m}" not in taken)
            if len(group) > 1:
                groups.append(group)
    return groups
