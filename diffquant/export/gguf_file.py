"""Export to GGUF: one `.gguf` file that diffusers' GGUF backend and ComfyUI-GGUF load.

GGUF stores a Linear weight as rows of fixed-size blocks along K (ggml's `ggml-common.h`; the
`gguf` package's `quants.py` has the same layouts in numpy). Where a diffquant grid is a GGUF grid,
the codes are copied unchanged and only the scale is re-encoded:

| diffquant weight | GGUF type | block (bytes) | mapping |
|---|---|---|---|
| int8 symmetric, any scale granularity whose groups are multiples of 32 | Q8_0 | fp16 d, 32 x int8 | d = fp16(s) per block, q unchanged |
| int4 symmetric, groups multiple of 32 | Q4_0 | fp16 d, 16 bytes | u = q + 8; byte j = u[j] \\| u[j+16] << 4; value (u - 8) d |
| int4 / uint4 with zero point | Q4_1 | fp16 d, fp16 m, 16 bytes | u = q - qmin; d = fp16(s), m = fp16((qmin - zp) s) |
| mxfp4 (opt-in: `quant_type="MXFP4"`) | MXFP4 | E8M0 e, 16 bytes | e and the E2M1 codes unchanged |

**Scale rounding.** GGUF scales are IEEE fp16 (round to nearest even here, numpy's `astype`).
For a scale s in fp16's normal range [2^-14, 65504] the stored d has |d - s| <= 2^-11 s, so each
dequantized weight moves by at most |q| 2^-11 s (<= 127 * 2^-11 s for Q8_0, 8 * 2^-11 s for
Q4_0); below 2^-14 the error is at most 2^-25 absolute per scale. A scale above 65504 is
refused. The export notes the largest relative change of any scale. Readers then compute
`float32(q) * float32(d)` (the gguf package) or, in diffusers 0.42.1's `dequantize_gguf_tensor`,
`fp16(q * d)`: one more fp16 rounding, at most 2^-11 relative, and `GGUFLinear` then casts that
to the compute dtype (a third rounding, 2^-8 relative, in a bf16 model). diffquant computes
bf16(q * s) once; for Q8_0 in a bf16 model the double rounding bf16(fp16(q * fp16(s))) moves 5.5%
of tiny-flux's int8_weight_only weights by one bf16 ulp, and its output SQNR by 0.79 dB. No
exporter-side choice of d removes it for a given checkpoint: for none of that checkpoint's 38
per-tensor scales does any fp16 d within 16 ulps of fp16(s) give bf16(fp16(q * d)) == bf16(q * s)
for all 255 codes (measured), and the cast is in `GGUFLinear.forward_native`, not in the file. The
choice is made at quantization instead: the `gguf_q8_0` recipe (Q8_0's own grid, int8 per group
of 32) takes each group's fp16 scale, stepped up from amax / 127, at which every code's
bf16(fp16(q * s)) is bf16(q * s) (`fp16_products`, `quant.formats.affine.fp16_product_scales`),
so the runtime's weights are diffquant's bit for bit and the outputs agree (0.000 dB on
tiny-flux). ComfyUI-GGUF's `dequantize_blocks_Q8_0` (city96/ComfyUI-GGUF `dequant.py`, read at
2dcc039, not run here) is the same d * q in fp16 at its default
`dequant_dtype`; with `dequant_dtype=float32` it computes fl32(q * d), then the cast, which is
diffquant's rounding for any fp16 scale (its `target` setting, bf16(bf16(d) * q), is not). The
export report counts the weights the runtime's arithmetic moves (`runtime_moved`). All of this is
diffusers' `GGUFLinear.forward_native`, its default; with `DIFFUSERS_GGUF_CUDA_KERNELS=1` on a GPU
it runs fused kernels whose arithmetic differs.

Any other combination is requantized from diffquant's dequantized weight with the `gguf`
package's own quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) when `quant_type` asks for it, and the
export reports the weight SQNR that costs. K-quants (Q4_K, Q6_K) take 256-element super-blocks
whose sub-block scales are 6- or 8-bit multiples of one fp16 scale: no diffquant grid (per-group
fp32 scales) lands on them exactly, and the gguf package has no quantizer for them, so they are
refused.

What GGUF cannot carry is refused, never dropped: activation quantization (GGUF is weight-only),
the SVDQuant smoothing and low-rank branch, and asymmetric int8 (Q8_0 is symmetric). Conv2d
layers and Linear layers whose K is not a multiple of 32 are written dequantized, in the model's
dtype (the values are diffquant's, bit for bit; the size is not reduced): diffusers' GGUF backend
replaces only `nn.Linear`. 1-D tensors are written as F32 (exact for bf16 / fp16 values), other
unquantized tensors in their dtype.

Names: for Flux the original BFL names (`single_file_keys.original_layout`, ComfyUI-GGUF's
layout; fused qkv / linear1 rows are the concatenation of the parts' block rows, exact since
blocks never cross rows); other families keep the diffusers names, which diffusers'
`from_single_file` loads without conversion. `names="diffusers"` forces the latter.

Example:
    >>> import numpy as np
    >>> q8_0_blocks(np.array([[1, -2] * 16], dtype=np.int8), np.array([[0.5]], dtype=np.float32)).shape
    (1, 34)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffquant.artifacts.atomic import partial_path, publish
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.eval.metrics import sqnr_db
from diffquant.export import ExportReport
from diffquant.export.single_file_keys import OriginalTensor, original_layout
from diffquant.export.stored import StoredCheckpoint, refuse_inputs, refuse_svd, unpack_int4

BLOCK = 32
FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
REQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# ComfyUI-GGUF's architecture names (its loader picks the model by `general.architecture`).
_ARCH = {"flux": "flux", "sdxl": "sdxl", "sd15": "sd1", "sd21": "sd1", "sd3": "sd3", "pixart": "pixart"}


def export(checkpoint: Path, out: Path, quant_type: str | None = None, names: str | None = None) -> ExportReport:
    """Write `checkpoint` as one GGUF file `out` (see the module docstring)."""
    import gguf

    source = StoredCheckpoint.read(checkpoint)
    refuse_inputs(source, "GGUF", "w4a16 or int8_weight_only")
    refuse_svd(source, "GGUF", "w4a16")
    if quant_type is not None and quant_type not in (*REQUANTIZABLE, "MXFP4"):
        raise ConfigError(f"GGUF quant_type {quant_type!r} is not supported here (K-quants have no exact mapping nor a gguf-py quantizer)",
                          f"use one of {', '.join((*REQUANTIZABLE, 'MXFP4'))}")
    if names not in (None, "original", "diffusers"):
        raise ConfigError(f"names={names!r} is not allowed", "use 'original' or 'diffusers'")
    report = ExportReport(format="gguf", out=Path(out))
    tensors = _gguf_tensors(source, quant_type, report)
    layout = original_layout(source.family, list(tensors)) if names != "diffusers" else None
    if layout is not None:
        tensors = _fuse(tensors, layout)
        report.notes.append(f"original {source.family} key names (fused groups concatenated by rows)")
    else:
        report.notes.append("diffusers key names")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out)
    writer = gguf.GGUFWriter(str(tmp), _ARCH.get(source.family, source.family or "unknown"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("diffquant.recipe", source.recipe_name)
    writer.add_string("diffquant.model", str(source.manifest["model"].get("name", "")))
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    publish(tmp, out)
    report.files.append(out.name)
    return report


def _gguf_tensors(source: StoredCheckpoint, quant_type: str | None, report: ExportReport) -> dict[str, tuple[np.ndarray, Any]]:
    """Every tensor of the export under its diffusers name: (numpy array, GGUF type)."""
    import gguf

    owned = {key for record in source.layers for key in record.tensors.values()}
    arrays: dict[str, tuple[np.ndarray, Any]] = {}
    worst_scale = 0.0
    moved = total = 0
    for name, tensor in source.tensors.items():
        if name not in owned:
            arrays[name] = _plain(tensor)
    for record in source.layers:
        key = f"{record.name}.weight"
        exact = _exact_type(source, record)
        if record.type != "Linear" or record.in_features % BLOCK:
            arrays[key] = _plain(source.dequantized(record, source.compute_dtype))
            report.layers["dequantized (Conv2d or K % 32 != 0)"] = report.layers.get("dequantized (Conv2d or K % 32 != 0)", 0) + 1
            continue
        wanted = quant_type or (exact if exact != "MXFP4" else None)
        if wanted is None and exact == "MXFP4":
            raise ConfigError(
                f"layer {record.name} is mxfp4: GGUF's MXFP4 blocks hold it exactly, but diffusers 0.42.1's GGUF backend does not load MXFP4",
                "pass quant_type='MXFP4' for readers that do (llama.cpp's ggml, the gguf package), or quant_type='Q4_1' to requantize",
            )
        if wanted is None:
            raise ConfigError(
                f"GGUF has no block type equal to layer {record.name}'s {_describe(record)} grid",
                "pass quant_type='Q8_0', 'Q5_1' or 'Q4_1' to requantize, or quantize with w4a16 or int8_weight_only",
            )
        if wanted == exact:
            blocks, rel = _exact_blocks(source, record, exact)
            worst_scale = max(worst_scale, rel)
            if exact != "MXFP4":
                moved += runtime_moved(blocks, exact, source.dequantized(record, source.compute_dtype).reshape(record.out_features, -1))
                total += record.out_features * record.in_features
            report.layers[f"{exact} exact"] = report.layers.get(f"{exact} exact", 0) + 1
        else:
            if wanted == "MXFP4":
                raise ConfigError(f"layer {record.name} is {_describe(record)}, not mxfp4", "MXFP4 blocks are exact only from the mxfp4 recipe")
            weight = source.dequantized(record).reshape(record.out_features, -1).numpy()
            blocks = gguf.quants.quantize(weight, getattr(gguf.GGMLQuantizationType, wanted))
            back = torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, wanted)))
            report.notes.append(f"{record.name}: requantized {_describe(record)} -> {wanted}, weight SQNR vs diffquant {sqnr_db(torch.from_numpy(weight), back):.2f} dB")
            report.layers[f"{wanted} requantized"] = report.layers.get(f"{wanted} requantized", 0) + 1
        arrays[key] = (np.ascontiguousarray(blocks), getattr(gguf.GGMLQuantizationType, wanted))
    if total:
        dtype = str(source.compute_dtype).removeprefix("torch.")
        report.notes.append(
            f"diffusers' and ComfyUI-GGUF's fp16 dequantization cast to {dtype} gives diffquant's weights bit for bit" if moved == 0 else
            f"diffusers' and ComfyUI-GGUF's fp16 dequantization cast to {dtype} moves {moved} of {total} weights ({100 * moved / total:.2f}%) "
            f"off diffquant's (in a bf16 model the recipe gguf_q8_0 chooses scales where it moves none)")
    if worst_scale:
        report.notes.append(f"fp16 scales: largest relative change {worst_scale:.3g} (bound 2^-11 = {2**-11:.3g} in fp16's normal range)")
    return arrays


def _describe(record: LayerRecord) -> str:
    spec = record.weight
    extra = f" g{spec['group_size']}" if spec.get("granularity") == "per_group" else ""
    return f"{spec['dtype']} {spec.get('granularity', '')}{extra}{'' if spec.get('symmetric', True) else ' asymmetric'}".strip()


def _exact_type(source: StoredCheckpoint, record: LayerRecord) -> str | None:
    """The GGUF type whose grid equals the layer's, or None."""
    spec = record.weight
    groups_fit = spec.get("granularity") != "per_group" or (spec.get("group_size") or 0) % BLOCK == 0
    has_zero = "weight_zero_point" in record.tensors
    if spec["dtype"] == "int8" and groups_fit:
        if has_zero:
            raise ConfigError(f"GGUF Q8_0 is symmetric, but layer {record.name} has int8 zero points", "quantize with int8_weight_only (symmetric)")
        return "Q8_0"
    if spec["dtype"] in ("int4", "uint4") and groups_fit:
        return "Q4_1" if has_zero or spec["dtype"] == "uint4" else "Q4_0"
    if spec["dtype"] == "mxfp4":
        return "MXFP4"
    return None


def _exact_blocks(source: StoredCheckpoint, record: LayerRecord, qtype: str) -> tuple[np.ndarray, float]:
    """uint8 block rows [out, K/32 * block bytes] with diffquant's codes, and the largest relative
    change of a scale by fp16 rounding."""
    out, k = record.out_features, record.in_features
    if qtype == "MXFP4":
        stored = source.stored(record)
        codes = unpack_int4(stored["weight_packed"], signed=False).numpy().astype(np.uint8).reshape(out, k // BLOCK, BLOCK)
        exponents = stored["weight_scale"].numpy().astype(np.uint8).reshape(out, k // BLOCK, 1)
        return np.concatenate([exponents, _nibble_halves(codes)], axis=-1).reshape(out, -1), 0.0
    scale = source.scale_per_column(record)[:, ::BLOCK].numpy().astype(np.float32)
    if not np.all(np.isfinite(scale)) or float(np.abs(scale).max(initial=0.0)) > FP16_MAX:
        raise ConfigError(f"layer {record.name} has a weight scale beyond fp16's range ({FP16_MAX})", "GGUF scales are fp16; requantize with quant_type='Q8_0'")
    d16 = scale.astype(np.float16)
    rel = float(np.max(np.abs(d16.astype(np.float32) - scale) / np.where(scale == 0, 1, np.abs(scale)), initial=0.0))
    codes = source.int_codes(record).numpy()
    if qtype == "Q8_0":
        return q8_0_blocks(codes.astype(np.int8), scale), rel
    qmin = -8 if record.weight["dtype"] == "int4" else 0
    unsigned = (codes - qmin).astype(np.uint8).reshape(out, k // BLOCK, BLOCK)
    d_bytes = d16.reshape(out, k // BLOCK, 1).view(np.uint8)
    if qtype == "Q4_0":
        return np.concatenate([d_bytes, _nibble_halves(unsigned)], axis=-1).reshape(out, -1), rel
    zero = source.scale_per_column(record, "weight_zero_point")[:, ::BLOCK].numpy() if "weight_zero_point" in record.tensors else np.zeros_like(scale)
    m16 = ((qmin - zero) * scale).astype(np.float16).reshape(out, k // BLOCK, 1).view(np.uint8)
    return np.concatenate([d_bytes, m16, _nibble_halves(unsigned)], axis=-1).reshape(out, -1), rel


def runtime_moved(blocks: np.ndarray, qtype: str, reference: torch.Tensor) -> int:
    """How many weights of Q8_0 / Q4_0 / Q4_1 block rows [out, ...] dequantize, as diffusers'
    `dequantize_gguf_tensor` and ComfyUI-GGUF compute them (fp16 arithmetic on the block: d · q,
    d · (u - 8), d · u + m) and then cast to `reference`'s dtype, to another value than
    `reference` [out, K] (diffquant's weight in the compute dtype)."""
    out = reference.shape[0]
    width = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    b = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(out, -1, width)
    d = b[..., :2].contiguous().view(torch.float16)
    if qtype == "Q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8)
    else:
        nibbles = b[..., width - 16:]
        u = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.int8)
        w = d * (u - 8) if qtype == "Q4_0" else d * u + b[..., 2:4].contiguous().view(torch.float16)
    return int((w.reshape(out, -1).to(reference.dtype) != reference).sum())


def q8_0_blocks(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes [out, K] and one float32 scale per 32 codes [out, K/32] -> Q8_0 rows [out, K/32 * 34]."""
    out, k = codes.shape
    d_bytes = scale.astype(np.float16).reshape(out, k // BLOCK, 1).view(np.uint8)
    return np.concatenate([d_bytes, codes.reshape(out, k // BLOCK, BLOCK).view(np.uint8)], axis=-1).reshape(out, -1)


def _nibble_halves(codes: np.ndarray) -> np.ndarray:
    """[..., 32] 4-bit codes -> [..., 16] bytes, byte j = c[j] | c[j + 16] << 4 (ggml's QK4 order)."""
    return (codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)).astype(np.uint8)


def _plain(tensor: torch.Tensor) -> tuple[np.ndarray, Any]:
    """An unquantized tensor: 1-D as F32, else F32 / F16 / BF16 in its own dtype."""
    import gguf

    types = gguf.GGMLQuantizationType
    if tensor.dim() <= 1 or tensor.dtype == torch.float32:
        return tensor.float().contiguous().numpy(), types.F32
    if tensor.dtype == torch.float16:
        return tensor.contiguous().numpy(), types.F16
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy(), types.BF16
    raise ConfigError(f"a {tensor.dtype} tensor has no GGUF type", "quantize a model in float32, float16 or bfloat16")


def _fuse(tensors: dict[str, tuple[np.ndarray, Any]], layout: list[OriginalTensor]) -> dict[str, tuple[np.ndarray, Any]]:
    """The tensors under their original names: fused parts concatenated by rows, halves swapped where marked."""
    fused: dict[str, tuple[np.ndarray, Any]] = {}
    for original in layout:
        parts = [tensors[key] for key in original.parts]
        kinds = {int(qtype) for _, qtype in parts}
        if len(kinds) != 1:
            raise ConfigError(f"the parts of {original.name} ({', '.join(original.parts)}) are stored in different GGUF types",
                              "quantize the whole group alike (no exclude pattern that splits it), or export with names='diffusers'")
        array = np.concatenate([a for a, _ in parts], axis=0) if len(parts) > 1 else parts[0][0]
        if original.swap_halves:
            half = array.shape[0] // 2
            array = np.concatenate([array[half:], array[:half]], axis=0)
        fused[original.name] = (np.ascontiguousarray(array), parts[0][1])
    return fused
