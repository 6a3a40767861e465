"""Number formats as pure functions over tensors: choose scales, quantize, dequantize, pack.

One file per format; each keeps a notable-values table `(name, bits, value)` with the bit
encodings and where they were checked, walked by tests/test_formats.py:

| format | module | table |
|---|---|---|
| INT8 / UINT8 / INT4 / UINT4 | `affine` | `INT8_TABLE`, `UINT8_TABLE`, `INT4_TABLE`, `UINT4_TABLE` |
| FP8 E4M3FN / E5M2 | `fp8` | `FP8_E4M3_TABLE`, `FP8_E5M2_TABLE` |
| E2M1 (FP4 element) | `e2m1` | `E2M1_TABLE` (all 16 codes) |
| E8M0 (MX block scale) | `mxfp4` | `E8M0_TABLE` |
| MXFP4 / NVFP4 | `mxfp4`, `nvfp4` | (E2M1 + E8M0 / E4M3 above) |

Block layout helpers live in `blocks`, 4-bit packing (low nibble = even index) in `pack`.
"""

from diffquant.quant.formats.affine import (
    INT4_TABLE,
    INT8_TABLE,
    UINT4_TABLE,
    UINT8_TABLE,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)
from diffquant.quant.formats.blocks import (
    GRANULARITIES,
    from_blocks,
    reduce_for_granularity,
    to_blocks,
)
from diffquant.quant.formats.e2m1 import (
    E2M1_EMAX,
    E2M1_MAX,
    E2M1_TABLE,
    E2M1_VALUES,
    dequantize_e2m1,
    quantize_e2m1,
)
from diffquant.quant.formats.fp8 import (
    FP8_E4M3_MAX,
    FP8_E4M3_TABLE,
    FP8_E5M2_MAX,
    FP8_E5M2_TABLE,
    FP8_MAX,
    choose_fp8_scale,
    dequantize_fp8,
    quantize_fp8,
)
from diffquant.quant.formats.mxfp4 import (
    E8M0_BIAS,
    E8M0_TABLE,
    MXFP4_BLOCK_SIZE,
    MXFP4_SCALE_MODE,
    e8m0_to_float,
    mxfp4_dequantize,
    mxfp4_quantize,
)
from diffquant.quant.formats.nvfp4 import (
    NVFP4_BLOCK_SIZE,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
)
from diffquant.quant.formats.pack import (
    int4_to_nibbles,
    nibbles_to_int4,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = [
    "E2M1_EMAX",
    "E2M1_MAX",
    "E2M1_TABLE",
    "E2M1_VALUES",
    "E8M0_BIAS",
    "E8M0_TABLE",
    "FP8_E4M3_MAX",
    "FP8_E4M3_TABLE",
    "FP8_E5M2_MAX",
    "FP8_E5M2_TABLE",
    "FP8_MAX",
    "GRANULARITIES",
    "INT4_TABLE",
    "INT8_TABLE",
    "MXFP4_BLOCK_SIZE",
    "MXFP4_SCALE_MODE",
    "NVFP4_BLOCK_SIZE",
    "UINT4_TABLE",
    "UINT8_TABLE",
    "choose_fp8_scale",
    "choose_qparams_affine",
    "dequantize_affine",
    "dequantize_e2m1",
    "dequantize_fp8",
    "e8m0_to_float",
    "from_blocks",
    "int4_to_nibbles",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "nibbles_to_int4",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "pack_nibbles",
    "quantize_affine",
    "quantize_e2m1",
    "quantize_fp8",
    "reduce_for_granularity",
    "to_blocks",
    "unpack_nibbles",
]
