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

Block layout helpers live in `blocks`, 4-bit packing (low nibble = even index) in `pack`. Import
from the module that defines a name (`from diffquant.quant.formats.fp8 import quantize_fp8`).
"""
