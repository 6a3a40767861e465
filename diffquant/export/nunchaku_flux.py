"""`nunchaku-flux`: nunchaku's single-file Flux transformer (ComfyUI-nunchaku, SGLang's `nunchaku-svdq`).

One safetensors file whose keys are those nunchaku's `convert_flux_state_dict` maps onto
`NunchakuFluxTransformer2DModelV2` (nunchaku-tech/nunchaku, nunchaku/models/transformers/
transformer_flux_v2.py at 49bec14d21d125a542a8cacdfbd98ea256a026cd), and the metadata its loader
reads: `config` (the transformer's diffusers config, `_build_model`), `model_class` and
`quantization_config` (as nunchaku/merge_safetensors.py writes them).

| file key (per block) | diffusers layers | kind |
|---|---|---|
| `transformer_blocks.N.qkv_proj` | attn.to_q, to_k, to_v, stacked along N | SVDQ W4A4 |
| `transformer_blocks.N.qkv_proj_context` | attn.add_q_proj, add_k_proj, add_v_proj | SVDQ W4A4 |
| `transformer_blocks.N.out_proj`, `out_proj_context` | attn.to_out.0, attn.to_add_out | SVDQ W4A4 |
| `transformer_blocks.N.mlp_fc1`, `mlp_fc2`, `mlp_context_fc1`, `mlp_context_fc2` | ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2 | SVDQ W4A4 |
| `transformer_blocks.N.norm1.linear`, `norm1_context.linear` | the same | AWQ W4A16, rows interleaved by 6 |
| `transformer_blocks.N.norm_q`, `norm_k`, `norm_added_q`, `norm_added_k` | attn.norm_q, ... (RMSNorm weights) | plain |
| `single_transformer_blocks.N.qkv_proj` | attn.to_q, to_k, to_v | SVDQ W4A4 |
| `single_transformer_blocks.N.mlp_fc1` | proj_mlp | SVDQ W4A4 |
| `single_transformer_blocks.N.out_proj`, `mlp_fc2` | proj_out, columns [0, inner) and [inner, inner + mlp) | SVDQ W4A4 |
| `single_transformer_blocks.N.norm.linear` | the same | AWQ W4A16, rows interleaved by 3 |
| `single_transformer_blocks.N.norm_q`, `norm_k` | attn.norm_q, attn.norm_k | plain |
| everything else (x_embedder, context_embedder, time_text_embed, norm_out, proj_out) | the same, unquantized | plain |

Two precisions, told apart by the checkpoint's first attention projection: NVFP4
(`svdquant_nvfp4_nunchaku`) and INT4 g64 (`svdquant_w4a4_nunchaku`). nunchaku's loader builds the model for the GPU's precision
(`get_precision`: fp4 on sm_120 / 121, int4 otherwise) and reads `rank` from `quantization_config`;
the metadata carries merge_safetensors' fields for the file's precision (int4: dtype int4,
group_size 64, scale_dtype None), which nunchaku's v1 loader checks against the GPU.

An SVDQ layer stores `qweight`, `wscales`, `smooth`, `smooth_orig`, `lora_down`, `lora_up`,
`bias`, and for NVFP4 `wtscale` and `wcscales` (INT4: `wscales` [K/64, N] in the compute dtype and
neither of those, as `SVDQW4A4Linear(precision="int4")` allocates them and `patch_scale_key` loads
them), in the Nunchaku Lite packing (`nunchaku_pack`, the
same `SVDQW4A4Linear` parameters under the names the converter renames: smooth -> smooth_factor,
lora_down -> proj_down, lora_up -> proj_up); `smooth_orig` (smooth_factor_orig, which nunchaku's
forward does not read) is written equal to `smooth`. An AWQ layer stores `qweight`, `wscales`,
`wzeros`, `bias` as Nunchaku Lite's `awq_w4a16`.

What the layout needs beyond Nunchaku Lite's packing, and how it is met exactly:
- fused q/k/v: one smoothing factor, one `lora_down` and (NVFP4) one `wtscale` per group. The
  checkpoint's parts must share them (recipe `share_groups: qkv`); the fused layer is then the
  parts stacked, `lora_up` stacked along N at rank r. Parts that differ are refused.
- the single block's proj_out is split along K: out_proj takes the attention columns, mlp_fc2 the
  MLP columns, each with its columns of the codes, scales, smoothing and `lora_down` and the whole
  `lora_up`; nunchaku adds the two outputs, so the branch sums to lora_up (lora_down x) and the
  bias is written once (out_proj; mlp_fc2 gets zeros).
- modulation (AdaLayerNormZero / Single) linears: nunchaku reads the output as
  `emb.view(B, -1, 6)` (3 for single blocks), so row c * dim + d of diffusers' weight is row
  d * 6 + c here; and with `scale_shift=0` the 1 of (1 + scale) is added to the bias of the scale
  rows (chunks 1 and 4; single: 1), rounded once to the compute dtype (half an ulp of 1 + b).

INT4's mlp_fc2 inputs (nunchaku-tech/nunchaku at 3a3cc3d0649a7d5bc575dc899a03f2d4456df181;
`diffquant.quant.shifted_inputs` has the kernel lines): `NunchakuFeedForward` and
`NunchakuFluxSingleTransformerBlock` set `mlp_fc2.act_unsigned = precision != "nvfp4"`
(nunchaku/models/attention.py l. 99, nunchaku/models/transformers/transformer_flux_v2.py l. 285)
and run `fused_gelu_mlp` (nunchaku/ops/fused.py), whose fc1 epilogue quantizes gelu(y) +
SHIFT_GELU (0.171875, src/kernels/zgemm/gemm_w4a4_launch_impl.cuh l. 286), divided by mlp_fc2's
smoothing, as unsigned int4 (max / 15 per 64, round half to even, clamp [0, 15]), while the branch
takes the unshifted output. Nothing at run time corrects the shift; the bias must (DeepCompressor,
mit-han-lab/deepcompressor at 69f3473: `ShiftedLinear.from_linear` b - W c and
backend/nunchaku/convert.py + lora_up (lora_down / s) c). These checkpoints record that input
(`shift: 0.171875` from column 0 for ff.net.2 / ff_context.net.2, from the MLP column `inner` for
a single block's proj_out, whose MLP columns become mlp_fc2) and store diffquant's own corrected
bias (b - c deq(R) / s summed over the shifted columns), which is written as it is: an INT4
checkpoint whose mlp_fc2 inputs are not shifted that way, or whose other inputs are, is refused.
Everything else of INT4 is as NVFP4: the same packing of signed codes, smoothing, branch, AWQ
modulation layers and key set.

Numerics otherwise as Nunchaku Lite's (`nunchaku_lite`): codes unchanged, scales / smoothing /
low-rank factors rounded once to the compute dtype (svdquant_w4a4_nunchaku's weight scales are
already bfloat16 values there, `scale_dtype: model`). Refused, in one line with a recipe that fits:
an SVD rank other than 32 (`SVDQW4A4Linear`'s default, which the loader builds), static inputs,
INT4 inputs scaled otherwise than amax / 7, a block linear left unquantized or quantized another
way, shapes off nunchaku's 128-wide tiles, and anything but a Flux transformer. The kernels need
CUDA; the tests check the key set, shapes, dtypes and packing on the CPU, and one int4 mlp_fc2
computed from the file by the kernels' arithmetic against diffquant's layer.

Example:
    >>> interleave_rows(torch.arange(6).reshape(6, 1), 3).flatten().tolist()
    [0, 2, 4, 1, 3, 5]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.atomic import partial_path, publish
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.nunchaku_lite import awq_tensors
from diffquant.export.nunchaku_pack import K_ALIGN, WARP_N, pack_int4_weight, pack_lowrank, pack_micro_scales, pack_scales
from diffquant.export.stored import StoredCheckpoint, component_config, unpack_int4

RANK = 32  # SVDQW4A4Linear's default rank, the one NunchakuFluxTransformer2DModelV2 builds
FITS_BY_PRECISION = {"nvfp4": "svdquant_nvfp4_nunchaku", "int4": "svdquant_w4a4_nunchaku"}
FITS = " or ".join(FITS_BY_PRECISION.values())
SHIFT_GELU = 0.171875  # nunchaku's int4 mlp_fc2 input shift (gemm_w4a4_launch_impl.cuh `SHIFT_GELU`)
MODEL_CLASS = "NunchakuFluxTransformer2dModel"
DOUBLE_SVDQ = {"qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "qkv_proj_context": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "out_proj": ("attn.to_out.0",), "out_proj_context": ("attn.to_add_out",),
               "mlp_fc1": ("ff.net.0.proj",), "mlp_fc2": ("ff.net.2",),
               "mlp_context_fc1": ("ff_context.net.0.proj",), "mlp_context_fc2": ("ff_context.net.2",)}  # fmt: skip
DOUBLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k"}
SINGLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
# AdaLayerNormZero chunks: shift, scale, gate (x2 in double blocks); the scale chunks get the +1
MODULATION = {"norm1.linear": (6, (1, 4)), "norm1_context.linear": (6, (1, 4))}
SINGLE_MODULATION = {"norm.linear": (3, (1,))}


@dataclass
class SvdqWeight:
    """One nunchaku SVDQ layer before packing: codes [N, K] (nvfp4: E2M1, int4: signed), scales
    (nvfp4: E4M3 blocks [N, K/16]; int4: float32 groups [N, K/64]), weight_scale_2 (nvfp4; None
    for int4), smoothing [K], lora_down [r, K], lora_up [N, r] (float32), bias [N] or None."""

    precision: str
    codes: torch.Tensor
    scales: torch.Tensor
    scale_2: torch.Tensor | None
    smooth: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None


def export(checkpoint: Path, out: Path, config: Path | None = None, compute_dtype: str | None = None) -> ExportReport:
    """Write `checkpoint` (a Flux transformer) as nunchaku's single file `out` (see the module docstring)."""
    source = StoredCheckpoint.read(checkpoint)
    if source.family != "flux":
        raise ConfigError(f"nunchaku's single-file layout here is Flux's, the checkpoint is {source.family or 'unknown'}", "export a Flux checkpoint, or use --to nunchaku-lite")
    model_dtype = source.manifest["model"].get("torch_dtype")
    dtype_name = compute_dtype or (model_dtype if model_dtype in ("bfloat16", "float16") else "bfloat16")
    if dtype_name not in ("bfloat16", "float16"):
        raise ConfigError(f"nunchaku compute_dtype {dtype_name!r} is not allowed", "use bfloat16 or float16")
    dtype = getattr(torch, dtype_name)
    model_config = component_config(source, config)
    records = {record.name: record for record in source.layers}
    used: set[str] = set()
    norm_keys: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport(format="nunchaku-flux", out=Path(out))
    inner = int(model_config["num_attention_heads"]) * int(model_config["attention_head_dim"])

    precision = _precision(source, records)
    shifted = _shifted_inputs(model_config, inner)
    if precision == "int4":
        _check_shifts(source, records, shifted)

    def svdq(key: str, parts: tuple[str, ...]) -> SvdqWeight:
        used.update(parts)
        return _fused(source, [_record(records, name, source) for name in parts], key, precision)

    for i in range(int(model_config["num_layers"])):
        block = f"transformer_blocks.{i}"
        for target, parts in DOUBLE_SVDQ.items():
            _put(tensors, f"{block}.{target}", svdq(f"{block}.{target}", tuple(f"{block}.{p}" for p in parts)), dtype)
        for target, (chunks, scale_chunks) in MODULATION.items():
            used.add(f"{block}.{target}")
            _put_awq(tensors, f"{block}.{target}", source, _record(records, f"{block}.{target}", source), chunks, scale_chunks, dtype)
        norm_keys += _put_norms(tensors, source, block, DOUBLE_NORMS)
    for i in range(int(model_config["num_single_layers"])):
        block = f"single_transformer_blocks.{i}"
        _put(tensors, f"{block}.qkv_proj", svdq(f"{block}.qkv_proj", tuple(f"{block}.attn.{p}" for p in ("to_q", "to_k", "to_v"))), dtype)
        _put(tensors, f"{block}.mlp_fc1", svdq(f"{block}.mlp_fc1", (f"{block}.proj_mlp",)), dtype)
        proj_out = svdq(f"{block}.proj_out", (f"{block}.proj_out",))
        attention, mlp = _split_columns(proj_out, inner, f"{block}.proj_out")
        _put(tensors, f"{block}.out_proj", attention, dtype)
        _put(tensors, f"{block}.mlp_fc2", mlp, dtype)
        for target, (chunks, scale_chunks) in SINGLE_MODULATION.items():
            used.add(f"{block}.{target}")
            _put_awq(tensors, f"{block}.{target}", source, _record(records, f"{block}.{target}", source), chunks, scale_chunks, dtype)
        norm_keys += _put_norms(tensors, source, block, SINGLE_NORMS)
    left = sorted(set(records) - used)
    if left:
        raise ConfigError(f"layers {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} are quantized but nunchaku keeps them in 16 bits",
                          f"quantize with recipe {FITS} (it leaves the embedders, norm_out and the final proj_out unquantized)")
    owned = {key for record in source.layers for key in record.tensor_names()}
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    unplaced = sorted(k for k in source.tensors if k.startswith(blocks) and k not in owned and k not in norm_keys)
    if unplaced:
        raise ConfigError(f"tensors {', '.join(unplaced[:3])} of the transformer blocks have no place in nunchaku's Flux layout",
                          "export a FluxTransformer2DModel checkpoint (its blocks hold only the linears and the q/k norms)")
    tensors.update({key: value for key, value in source.tensors.items() if key not in owned and not key.startswith(blocks)})
    report.layers[f"svdq_w4a4 {precision}"] = sum(1 for key in tensors if key.endswith(".qweight") and tensors[key].dtype == torch.int8)
    report.layers["awq_w4a16 int4"] = sum(1 for key in tensors if key.endswith(".qweight") and tensors[key].dtype == torch.int32)
    report.notes.append(f"compute_dtype {dtype_name}: scales, smoothing, low-rank factors and biases rounded to it once; "
                        "modulation biases of the scale rows hold 1 + b")  # fmt: skip
    if precision == "int4":
        report.notes.append(f"int4: the mlp_fc2 inputs run as unsigned int4 of x + {SHIFT_GELU:g} (nunchaku's SHIFT_GELU); "
                            "their biases are diffquant's shift-corrected ones")  # fmt: skip
    metadata = {"config": json.dumps(model_config), "model_class": MODEL_CLASS, "quantization_config": json.dumps(quantization_config(precision))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    publish(tmp, out)
    report.files.append(str(out))
    return report


def quantization_config(precision: str = "nvfp4") -> dict[str, Any]:
    """The metadata `quantization_config` nunchaku's merge_safetensors writes for an FP4 or INT4
    model (nunchaku/merge_safetensors.py: dtype, scale_dtype, group_size, rank).

    Example:
        >>> quantization_config("int4")["weight"]
        {'dtype': 'int4', 'group_size': 64, 'scale_dtype': None}
    """
    if precision == "int4":
        int4 = {"dtype": "int4", "group_size": 64, "scale_dtype": None}
        return {"method": "svdquant", "weight": dict(int4), "activation": dict(int4), "rank": RANK}
    fp4 = {"dtype": "fp4_e2m1_all", "group_size": 16}
    return {"method": "svdquant", "weight": {**fp4, "scale_dtype": [None, "fp8_e4m3_nan"]}, "activation": {**fp4, "scale_dtype": "fp8_e4m3_nan"},
            "rank": RANK}  # fmt: skip


def interleave_rows(rows: torch.Tensor, chunks: int) -> torch.Tensor:
    """Rows [chunks * dim, ...] in diffusers' chunk order -> nunchaku's: row c * dim + d goes to d * chunks + c."""
    dim = rows.shape[0] // chunks
    return rows.reshape(chunks, dim, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def _record(records: dict[str, LayerRecord], name: str, source: StoredCheckpoint) -> LayerRecord:
    if name not in records:
        raise ConfigError(f"layer {name} is not quantized (recipe {source.recipe_name}), but nunchaku's Flux file holds it quantized",
                          f"quantize with recipe {FITS}")
    return records[name]


def _precision(source: StoredCheckpoint, records: dict[str, LayerRecord]) -> str:
    """nvfp4 or int4: the one W4A4 precision of the checkpoint's SVDQ layers (its attention q)."""
    probe = records.get("transformer_blocks.0.attn.to_q") or records.get("single_transformer_blocks.0.attn.to_q")
    precision = "int4" if probe is not None and probe.weight["dtype"] == "int4" else "nvfp4"
    return precision


def _shifted_inputs(model_config: dict[str, Any], inner: int) -> dict[str, int]:
    """The layers nunchaku runs as mlp_fc2 with shifted unsigned int4 inputs -> their first shifted column."""
    shifted = {}
    for i in range(int(model_config["num_layers"])):
        shifted.update({f"transformer_blocks.{i}.ff.net.2": 0, f"transformer_blocks.{i}.ff_context.net.2": 0})
    for i in range(int(model_config["num_single_layers"])):
        shifted[f"single_transformer_blocks.{i}.proj_out"] = inner
    return shifted


def _check_shifts(source: StoredCheckpoint, records: dict[str, LayerRecord], shifted: dict[str, int]) -> None:
    """int4: each mlp_fc2 input must be shifted by SHIFT_GELU from the column nunchaku shifts, and no other input."""
    for name, record in records.items():
        inputs = record.input or {}
        want = shifted.get(name)
        shift, start = inputs.get("shift"), inputs.get("shift_from", 0)
        if want is not None and (shift != SHIFT_GELU or start != want):
            raise ConfigError(f"layer {name} ({source.recipe_name}): nunchaku's int4 Flux quantizes mlp_fc2 inputs as unsigned int4 of gelu(x) + {SHIFT_GELU} "
                              f"from column {want}, and this checkpoint's are {'not shifted' if shift is None else f'shifted by {shift} from column {start}'}",
                              f"quantize with recipe {FITS_BY_PRECISION['int4']}")  # fmt: skip
        if want is None and shift is not None:
            raise ConfigError(f"layer {name} ({source.recipe_name}) has shifted inputs, but nunchaku shifts only the mlp_fc2 inputs",
                              f"quantize with recipe {FITS_BY_PRECISION['int4']}")


def _svdq_weight(source: StoredCheckpoint, record: LayerRecord, precision: str) -> SvdqWeight:
    """The layer's tensors for `precision` (its inputs' shift is checked beforehand, `_check_shifts`)."""
    here = f"layer {record.name} ({source.recipe_name})"
    fits = FITS_BY_PRECISION[precision]
    inputs = record.input or {}
    weight = record.weight
    if precision == "int4":
        int4_weight = weight["dtype"] == "int4" and weight.get("group_size") == 64 and weight.get("symmetric", True)
        int4_inputs = inputs.get("dtype") == "int4" and inputs.get("group_size") == 64 and inputs.get("symmetric", True) and inputs.get("dynamic")
        if not int4_weight or not int4_inputs or "weight_zero_point" in record.tensors:
            raise ConfigError(f"{here} is not INT4 g64 symmetric W4A4 with dynamic inputs, what nunchaku's int4 SVDQ layers run", f"quantize with recipe {fits}")
        if inputs.get("scale_rule", "qmax") != "qmax":
            raise ConfigError(f"{here} quantizes its int4 inputs with scale_rule {inputs['scale_rule']!r}, but nunchaku's kernel scales them by amax / 7 "
                              "(amax / 15 unsigned) at run time", f"quantize with recipe {fits}")  # fmt: skip
    elif weight["dtype"] != "nvfp4" or inputs.get("dtype") != "nvfp4" or not inputs.get("dynamic"):
        raise ConfigError(f"{here} is not NVFP4 W4A4 with dynamic inputs, what nunchaku's SVDQ layers run (the checkpoint's first attention layer is nvfp4)",
                          f"quantize with recipe {fits}")  # fmt: skip
    if record.out_features % WARP_N or record.in_features % K_ALIGN:
        raise ConfigError(f"{here} {list(record.shape)} is off nunchaku's tiles (N, K multiples of {WARP_N})", "export a model whose widths are multiples of 128")
    stored = source.stored(record)
    k = record.in_features
    if record.svd is None:
        smooth, down, up = torch.ones(k), torch.zeros(RANK, k), torch.zeros(record.out_features, RANK)
    else:
        svd = {suffix: source.tensors[key] for suffix, key in record.svd.tensors.items()}
        smooth, down, up = svd["smooth_factor"].float(), svd["lora_down"].float(), svd["lora_up"].float()
        if down.shape[0] != RANK:
            raise ConfigError(f"{here} has SVD rank {down.shape[0]}, nunchaku's Flux model is built with rank {RANK}", f"quantize with svdquant rank {RANK}")
    bias = source.tensors[record.bias] if record.bias is not None else None
    if precision == "int4":
        return SvdqWeight("int4", unpack_int4(stored["weight_packed"], signed=True), stored["weight_scale"].float(), None, smooth, down, up, bias)
    return SvdqWeight("nvfp4", unpack_int4(stored["weight_packed"], signed=False), stored["weight_scale"], stored["weight_scale_2"].float().reshape(()),
                      smooth, down, up, bias)  # fmt: skip


def _fused(source: StoredCheckpoint, records: list[LayerRecord], key: str, precision: str) -> SvdqWeight:
    """The parts stacked along N; they must share smoothing, lora_down and (nvfp4) weight_scale_2."""
    parts = [_svdq_weight(source, record, precision) for record in records]
    first = parts[0]
    for field in ("smooth", "down", "scale_2"):
        if field == "scale_2" and first.scale_2 is None:
            continue
        if not all(torch.equal(getattr(first, field), getattr(p, field)) for p in parts[1:]):
            what = {"smooth": "smoothing factors", "down": "lora_down", "scale_2": "weight_scale_2"}[field]
            raise ConfigError(f"{key} fuses {', '.join(r.name for r in records)}, whose {what} differ",
                              f"quantize with share_groups: qkv (recipe {FITS_BY_PRECISION[precision]})")
    biases = [p.bias for p in parts]
    bias = None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]
    return SvdqWeight(precision, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), first.scale_2, first.smooth,
                      first.down, torch.cat([p.up for p in parts]), bias)  # fmt: skip


def _split_columns(weight: SvdqWeight, at: int, name: str) -> tuple[SvdqWeight, SvdqWeight]:
    """proj_out's attention columns [0, at) and MLP columns [at, K); the bias stays with the first."""
    k = weight.codes.shape[1]
    if at % K_ALIGN or (k - at) % K_ALIGN:
        raise ConfigError(f"{name} splits at column {at} of {k}, off nunchaku's 128-wide tiles", "export a model whose widths are multiples of 128")
    blocks = at // (k // weight.scales.shape[1])  # scale columns before `at` (groups of 16 or 64)
    first = SvdqWeight(weight.precision, weight.codes[:, :at], weight.scales[:, :blocks], weight.scale_2, weight.smooth[:at], weight.down[:, :at],
                       weight.up, weight.bias)  # fmt: skip
    zero_bias = None if weight.bias is None else torch.zeros_like(weight.bias)
    second = SvdqWeight(weight.precision, weight.codes[:, at:], weight.scales[:, blocks:], weight.scale_2, weight.smooth[at:], weight.down[:, at:],
                        weight.up, zero_bias)  # fmt: skip
    return first, second


def _put(tensors: dict[str, torch.Tensor], key: str, weight: SvdqWeight, dtype: torch.dtype) -> None:
    n, k = weight.codes.shape
    smooth = weight.smooth.to(dtype)
    tensors[f"{key}.qweight"] = pack_int4_weight(weight.codes)
    if weight.precision == "int4":  # SVDQW4A4Linear(precision="int4"): wscales [K/64, N] in the compute dtype, no wtscale / wcscales
        tensors[f"{key}.wscales"] = pack_scales(weight.scales.to(dtype))
    else:
        assert weight.scale_2 is not None
        tensors[f"{key}.wscales"] = pack_micro_scales(weight.scales)
        tensors[f"{key}.wtscale"] = weight.scale_2.reshape(1).to(dtype)
        tensors[f"{key}.wcscales"] = pack_scales(torch.ones(n, 1, dtype=dtype))
    tensors[f"{key}.smooth"] = pack_scales(smooth.reshape(k, 1))
    tensors[f"{key}.smooth_orig"] = tensors[f"{key}.smooth"].clone()
    tensors[f"{key}.lora_down"] = pack_lowrank((weight.down / weight.smooth.reshape(1, -1)).to(dtype), down=True)
    tensors[f"{key}.lora_up"] = pack_lowrank(weight.up.to(dtype), down=False)
    if weight.bias is not None:
        tensors[f"{key}.bias"] = pack_scales(weight.bias.to(dtype).reshape(n, 1))


def _put_awq(tensors: dict[str, torch.Tensor], key: str, source: StoredCheckpoint, record: LayerRecord, chunks: int,
             scale_chunks: tuple[int, ...], dtype: torch.dtype) -> None:  # fmt: skip
    here = f"layer {record.name} ({source.recipe_name})"
    weight = record.weight
    if weight["dtype"] != "int4" or weight.get("group_size") != 64 or not weight.get("symmetric", True) or record.input is not None or record.svd is not None:
        raise ConfigError(f"{here}: nunchaku runs the modulation linears as AWQ W4A16 (int4 g64 symmetric weights, 16-bit inputs, no branch)",
                          f"quantize with recipe {FITS}")
    if record.out_features % (4 * chunks) or record.in_features % 64:
        raise ConfigError(f"{here} {list(record.shape)} is off the AWQ kernel's tiles (N in 4-row, K in 64 steps)", "export a model whose widths are multiples of 64")
    codes = interleave_rows(source.int_codes(record), chunks)
    scale = interleave_rows(source.stored(record)["weight_scale"], chunks)
    bias = source.tensors[record.bias].float() if record.bias is not None else torch.zeros(record.out_features)
    dim = record.out_features // chunks
    for chunk in scale_chunks:
        bias[chunk * dim:(chunk + 1) * dim] += 1.0
    packed = awq_tensors(codes, scale, interleave_rows(bias, chunks), dtype)
    tensors.update({f"{key}.{suffix}": value for suffix, value in packed.items()})


def _put_norms(tensors: dict[str, torch.Tensor], source: StoredCheckpoint, block: str, norms: dict[str, str]) -> list[str]:
    """The q/k RMSNorm weights under nunchaku's names; returns the source keys taken."""
    taken = []
    for target, module in norms.items():
        tensors[f"{block}.{target}.weight"] = source.tensors[f"{block}.{module}.weight"]
        taken.append(f"{block}.{module}.weight")
    return taken
