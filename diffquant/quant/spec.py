"""Tensor and layer quantization specs: plain frozen dataclasses validated on construction.

A `TensorSpec` says how one tensor (a weight, or a layer's input activation) is quantized: the
number format, the granularity of its scales, symmetric or affine, the rounding mode, static or
dynamic scales, and for static scales the observer that picks the clipping range. A `LayerSpec`
pairs a weight spec with an optional input spec.

Example:
    >>> TensorSpec.from_dict({"dtype": "int4", "granularity": "per_group", "group_size": 64})
    TensorSpec(dtype='int4', granularity='per_group', group_size=64, ...)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from diffquant.quant.errors import ConfigError

DTYPES = ("int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
ROUNDINGS = ("half_even", "half_even_reciprocal")
OBSERVERS = ("min_max", "percentile", "histogram", "mse", "histogrampro", "mse_search")
SCALE_RULES = ("qmax", "half_span")
HALF_DTYPES = ("bfloat16", "float16")  # the compute dtypes `scale_dtype: model` rounds scales to
SCALE_DTYPES = (*HALF_DTYPES, "model")
FP16_PRODUCT_DTYPES = ("bfloat16", "model")  # the compute dtype a runtime casts fp16(q · s) to
MATMULS = ("dequantized", "torchao")  # how a quantized input meets the weight in a Linear layer (`matmul`)
SHIFT_FROM_RULES = ("proj_mlp",)  # symbolic `shift_from` values, resolved per layer when it is planned
INT_DTYPES = ("int8", "uint8", "int4", "uint4")
BLOCK_FORMATS = {"mxfp4": 32, "nvfp4": 16}
FP8_DTYPES = ("fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is quantized.

    dtype: one of DTYPES. granularity (default per_tensor; per_group for mxfp4/nvfp4): per_tensor, per_channel (weights: one scale per output
    channel), per_group (group_size consecutive elements along the input dimension; for
    activations, along the channel dimension of each token), or per_token (dynamic inputs only:
    one scale per token / pixel over all its channels, torchao's `PerRow` activation
    granularity). mxfp4 and nvfp4 are always per_group
    with their block size (32 and 16). symmetric: zero point 0 (unsigned dtypes must be
    asymmetric). rounding: half_even (round half to even of fl(x / s), torch.round) or
    half_even_reciprocal (dynamic integer inputs only: round half to even of fl(x · fl(1 / s)),
    the arithmetic of torchao's `quantize_affine`, `torch.fake_quantize_per_*_affine` and Quark;
    it differs from half_even only where x / s lies within an ulp of a tie). dynamic: scales computed
    from each input at run time (activations only); static scales are frozen after calibration
    from the observer's clipping range (observer `mse_search`: integer weights only, a clip search
    on the weight itself, `algorithms.clip_search`). percentile: the percentile kept by the
    `percentile` observer. scale_rule (symmetric integer types; `formats.affine.choose_qparams_affine`):
    `qmax` (default) s = amax / qmax (amax / 7 for INT4, / 127 for INT8); `half_span` s = amax /
    ((qmax - qmin) / 2) (amax / 7.5, / 127.5), AMD Quark's rule and torchao's
    (`choose_qparams_affine`, MappingType.SYMMETRIC), opt-in. The rule turns the observer's range into a
    scale (the histogram observers still search their clip for the qmax grid). Left out of
    `to_dict` at its default, so existing manifests are unchanged. scale_dtype (scales of
    symmetric integer and fp8 tensors; default None, float32): for static scales `bfloat16` or
    `float16` rounds each chosen scale up to the next value of that dtype (never down, so the
    clipping range only grows), so a runtime that holds its scales in that dtype (Quark's reload
    keeps them in the model's dtype) reproduces diffquant's values exactly; for dynamic inputs it
    rounds each per-call scale to the *nearest* value of that dtype, which is what a runtime
    computing amax / divisor in the activation's dtype gets (torchao's `choose_qparams_affine`
    and `_choose_scale_float8` divide the bf16 amax in bf16: float32 quotient, then RNE to bf16,
    then widened to float32); `model` is the layer's compute dtype when
    that is bfloat16 or float16 and float32 (no rounding) otherwise, resolved per layer when the
    layer is planned (`resolve_scale_dtype`), so a manifest records the dtype used; left out of
    `to_dict` when None. shift (dynamic symmetric per-group int4 inputs only; default None): the
    input channels [shift_from, C) are quantized as x + shift on the unsigned grid of the same
    width (codes 0..15, zero point 0, s = max|x + shift| / 15 per group), nunchaku's shifted
    GELU inputs (`diffquant.quant.shifted_inputs`); shift_from: the first shifted channel, an
    int (a multiple of group_size) or `proj_mlp` (the columns a Flux single block's proj_mlp
    feeds into its proj_out, resolved per layer when planned, `resolve_shift_from`). Both are
    left out of `to_dict` at their defaults. fp16_products (static symmetric integer weights with
    `scale_dtype: float16`; default None): `bfloat16`, the dtype t a runtime casts its fp16
    products fl16(q · s) to, GGUF's Q8_0 / Q4_0 dequantization in diffusers and ComfyUI-GGUF; each
    group's scale is then the first fp16 value from the rounded-up amax / qmax, stepping up one
    fp16 ulp at a time (`formats.affine.fp16_product_scales`), for which every code's fl_t(fl16(q ·
    s)) equals fl_t(q · s), diffquant's own dequantization. `model` resolves, when the layer is
    planned, to `bfloat16` for a bf16 layer and to None otherwise: in a float16 layer the two
    already agree, and in a float32 one fl16(q · s) is exact only for scales of 4 significant
    bits, which no search near amax / qmax finds. Left out of `to_dict` when None. matmul (inputs
    of w8a8 Linear layers; default `dequantized`): how the quantized input meets the weight.
    `dequantized`: y = fl_t(x̂) · fl_t(ŵ)ᵀ + b, a GEMM in the compute dtype t of the dequantized
    operands. `torchao`: the GEMM torchao 0.18's kernels run, from the codes
    (`kernels.torchao_matmul`): dynamic int8 inputs (per token or per tensor) with int8
    per-tensor / per-channel weights, `Int8Tensor`'s y = fl_t(fl32(fl_t(fl32(q_x q_wᵀ) s_x) s_w) +
    b); dynamic per-tensor fp8 e4m3 inputs with per-tensor e4m3 weights, `torch._scaled_mm`'s y =
    fl_t(fl32(q_x s_x) fl32(q_w s_w)ᵀ + b). A recipe whose export is torchao's then computes its
    runtime's numbers; Conv2d layers (torchao quantizes Linear ones) keep `dequantized`. Left out
    of `to_dict` at its default.
    """

    dtype: str
    granularity: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "half_even"
    dynamic: bool = False
    observer: str = "min_max"
    percentile: float = 99.99
    scale_rule: str = "qmax"
    scale_dtype: str | None = None
    shift: float | None = None
    shift_from: int | str = 0
    fp16_products: str | None = None
    matmul: str = "dequantized"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if self.granularity is None:
            object.__setattr__(self, "granularity", "per_group" if self.dtype in BLOCK_FORMATS else "per_tensor")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_choice("observer", self.observer, OBSERVERS)
        _check_choice("scale_rule", self.scale_rule, SCALE_RULES)
        if self.observer == "mse_search" and self.dtype not in INT_DTYPES:
            raise ConfigError(f"observer mse_search searches integer weight scales, not {self.dtype}", "use observer: min_max")
        if self.scale_rule != "qmax":
            if self.dtype not in INT_DTYPES or not self.symmetric:
                raise ConfigError(f"scale_rule {self.scale_rule} applies to symmetric integer types, not {self.dtype} "
                                  f"{'sym' if self.symmetric else 'asym'}", "drop scale_rule, or use a symmetric int8/int4 spec")
        if self.scale_dtype is not None:
            if self.scale_dtype not in SCALE_DTYPES:
                raise ConfigError(f"scale_dtype {self.scale_dtype!r} is not allowed", f"use one of {', '.join(SCALE_DTYPES)}, or leave it out (float32)")
            if self.dtype in BLOCK_FORMATS or not self.symmetric or self.dtype not in INT_DTYPES + FP8_DTYPES:
                raise ConfigError(f"scale_dtype applies to scales of symmetric integer or fp8 tensors, not {self.dtype}"
                                  f"{'' if self.symmetric else ' asym'}", "drop scale_dtype")
        if self.rounding == "half_even_reciprocal" and not (self.dynamic and self.dtype in INT_DTYPES):
            raise ConfigError(f"rounding half_even_reciprocal applies to dynamic integer inputs, not {self.dtype}"
                              f"{' dynamic' if self.dynamic else ' static'}", "use rounding: half_even")
        if self.granularity == "per_channel" and self.dynamic:
            raise ConfigError("granularity per_channel is a weight's (one scale per output channel); a dynamic input has no such channel",
                              "use granularity: per_token (one scale per token) or per_tensor")
        if self.granularity == "per_token" and not self.dynamic:
            raise ConfigError("granularity per_token gives every token its own scale per call, so it needs dynamic scales",
                              "set dynamic: true, or use granularity: per_tensor")
        if self.dtype in BLOCK_FORMATS:
            block = BLOCK_FORMATS[self.dtype]
            if self.granularity != "per_group" or self.group_size not in (None, block):
                raise ConfigError(
                    f"{self.dtype} has granularity per_group with group_size {block} by definition, not "
                    f"{self.granularity}/{self.group_size}",
                    f"write granularity: per_group, group_size: {block} (or leave both out)",
                )
            object.__setattr__(self, "granularity", "per_group")
            object.__setattr__(self, "group_size", block)
            if not self.symmetric:
                raise ConfigError(f"{self.dtype} is a symmetric format", "set symmetric: true")
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size < 2 or self.group_size % 2:
                raise ConfigError(
                    f"granularity per_group needs an even group_size >= 2, got {self.group_size}",
                    "set group_size, e.g. 32, 64 or 128",
                )
        elif self.group_size is not None:
            raise ConfigError(f"group_size {self.group_size} is only allowed with granularity per_group", "drop group_size")
        if self.dtype in ("uint8", "uint4") and self.symmetric:
            raise ConfigError(f"{self.dtype} cannot be symmetric", "set symmetric: false, or use int8/int4")
        if self.dtype in FP8_DTYPES and not self.symmetric:
            raise ConfigError(f"{self.dtype} is a symmetric format", "set symmetric: true")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} is outside (0, 100]", "use e.g. 99.99")
        self._check_shift()
        _check_choice("matmul", self.matmul, MATMULS)
        if self.matmul == "torchao" and not (self.dynamic and self.symmetric and (
                (self.dtype == "int8" and self.granularity in ("per_token", "per_tensor"))
                or (self.dtype == "fp8_e4m3" and self.granularity == "per_tensor"))):  # fmt: skip
            raise ConfigError(f"matmul torchao applies to dynamic int8 (per_token / per_tensor) or fp8_e4m3 (per_tensor) inputs, not {self.describe()}",
                              "drop matmul, or use the int8_dynamic / fp8_dynamic input spec")
        if self.fp16_products is not None:
            _check_choice("fp16_products", self.fp16_products, FP16_PRODUCT_DTYPES)
            if self.dtype not in INT_DTYPES or not self.symmetric or self.dynamic or self.scale_dtype != "float16":
                raise ConfigError(f"fp16_products applies to static symmetric integer weights with scale_dtype float16, not {self.describe()}"
                                  f" with scale_dtype {self.scale_dtype}", "set scale_dtype: float16 on a symmetric int8 / int4 weight, or drop fp16_products")

    def _check_shift(self) -> None:
        if self.shift is None:
            if self.shift_from != 0:
                raise ConfigError(f"shift_from {self.shift_from!r} is set without a shift", "add shift: 0.171875, or drop shift_from")
            return
        if not isinstance(self.shift, (int, float)) or isinstance(self.shift, bool) or not math.isfinite(self.shift) or self.shift <= 0:
            raise ConfigError(f"shift {self.shift!r} is not allowed", "use a positive finite number, e.g. 0.171875 (nunchaku's SHIFT_GELU)")
        if (self.dtype != "int4" or not self.symmetric or not self.dynamic or self.granularity != "per_group"
                or self.scale_rule != "qmax"):  # fmt: skip
            raise ConfigError(f"shift applies to dynamic symmetric per-group int4 inputs (scale_rule qmax), not {self.describe()}",
                              "use {dtype: int4, granularity: per_group, group_size: 64, symmetric: true, dynamic: true}, or drop shift")
        if isinstance(self.shift_from, str):
            if self.shift_from not in SHIFT_FROM_RULES:
                raise ConfigError(f"shift_from {self.shift_from!r} is not allowed", f"use a column index or one of {', '.join(SHIFT_FROM_RULES)}")
        elif isinstance(self.shift_from, bool) or not isinstance(self.shift_from, int) or self.shift_from < 0 or self.shift_from % (self.group_size or 1):
            raise ConfigError(f"shift_from {self.shift_from!r} is not a column index on a group boundary",
                              f"use a non-negative multiple of group_size {self.group_size}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "tensor spec") -> "TensorSpec":
        """Build from a recipe mapping; unknown keys are an error listing the allowed keys."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {raw!r}", "write e.g. {dtype: int8}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"allowed keys are {', '.join(allowed)}")
        if "dtype" not in raw:
            raise ConfigError(f"{where} has no dtype", f"set dtype to one of {', '.join(DTYPES)}")
        try:
            return cls(**raw)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc

    def describe(self) -> str:
        """Short human form, e.g. `int4 g64 sym dynamic`."""
        gran = {"per_tensor": "tensor", "per_channel": "channel", "per_token": "token"}.get(self.granularity, f"g{self.group_size}")
        mode = "dynamic" if self.dynamic else f"static/{self.observer}"
        shift = "" if self.shift is None else f" shift+{self.shift:g}" + (f" from {self.shift_from}" if self.shift_from != 0 else "")
        return f"{self.dtype} {gran} {'sym' if self.symmetric else 'asym'} {mode}{shift}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as a mapping; an opt-in field at its default is left out, so the manifests
        of recipes that do not use it stay as they were."""
        raw = dataclasses.asdict(self)
        if raw["scale_rule"] == "qmax":
            del raw["scale_rule"]
        if raw["scale_dtype"] is None:
            del raw["scale_dtype"]
        if raw["shift"] is None:
            del raw["shift"]
        if raw["shift_from"] == 0:
            del raw["shift_from"]
        if raw["fp16_products"] is None:
            del raw["fp16_products"]
        if raw["matmul"] == "dequantized":
            del raw["matmul"]
        return raw


@dataclass(frozen=True)
class LayerSpec:
    """The specs of one layer: its weight, and optionally its input activation."""

    weight: TensorSpec
    input: TensorSpec | None = None

    def __post_init__(self) -> None:
        if self.weight.dynamic:
            raise ConfigError("a weight spec cannot be dynamic (weights are quantized once)", "remove dynamic: true from the weight spec")
        if self.input is not None and self.input.matmul == "torchao":
            w = self.weight
            fits = w.symmetric and w.dtype == self.input.dtype and w.granularity in (("per_tensor", "per_channel") if w.dtype == "int8" else ("per_tensor",))
            if not fits:
                raise ConfigError(f"matmul torchao with {self.input.dtype} inputs takes symmetric {self.input.dtype} per-tensor"
                                  f"{' or per-channel' if self.input.dtype == 'int8' else ''} weights, not {w.describe()}",
                                  "use the int8_dynamic or fp8_dynamic weight spec, or drop matmul")
        if self.input is not None and self.input.fp16_products is not None:
            raise ConfigError("fp16_products chooses weight scales for fp16 dequantization; inputs are not dequantized by a runtime that way",
                              "drop fp16_products from the input spec")
        if self.input is not None and self.input.observer == "mse_search":
            raise ConfigError("observer mse_search is for weights only (it searches the weight's own values)",
                              "use observer: mse for inputs")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> "LayerSpec":
        allowed = ("weight", "input")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping", "write {weight: {...}, input: {...}}")
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"allowed keys are {', '.join(allowed)}")
        if raw.get("weight") is None:
            raise ConfigError(f"{where} has no weight spec", "add weight: {dtype: ...}")
        weight = TensorSpec.from_dict(raw["weight"], f"{where}.weight")
        act = TensorSpec.from_dict(raw["input"], f"{where}.input") if raw.get("input") is not None else None
        return cls(weight=weight, input=act)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict(), "input": self.input.to_dict() if self.input else None}


def resolve_scale_dtype(spec: LayerSpec, compute_dtype: str) -> LayerSpec:
    """`spec` with `scale_dtype: model` replaced by the scale dtype of a layer computing in
    `compute_dtype` (a torch dtype name): bfloat16 / float16 for those, None (float32) otherwise;
    and `fp16_products: model` by `bfloat16` in a bf16 layer, None otherwise.

    Example:
        >>> spec = LayerSpec(TensorSpec("int8", scale_dtype="model"), TensorSpec("int8", scale_dtype="model"))
        >>> resolve_scale_dtype(spec, "bfloat16").weight.scale_dtype, resolve_scale_dtype(spec, "float32").input.scale_dtype
        ('bfloat16', None)
    """
    def resolved(tensor: TensorSpec | None) -> TensorSpec | None:
        if tensor is not None and tensor.fp16_products == "model":
            tensor = dataclasses.replace(tensor, fp16_products="bfloat16" if compute_dtype == "bfloat16" else None)
        if tensor is None or tensor.scale_dtype != "model":
            return tensor
        return dataclasses.replace(tensor, scale_dtype=compute_dtype if compute_dtype in HALF_DTYPES else None)

    return LayerSpec(weight=resolved(spec.weight), input=resolved(spec.input))  # type: ignore[arg-type]


def merge_layer_spec(base: LayerSpec, override: Mapping[str, Any], where: str) -> LayerSpec:
    """Apply a partial override (`{weight: {...}, input: {...} | null}`) on top of `base`.

    Keys given in an override replace those of the base spec; `input: null` removes input
    quantization for the matched layers.
    """
    raw: dict[str, Any] = base.to_dict()
    unknown = sorted(set(override) - {"weight", "input"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", "allowed keys are weight, input")
    for key in ("weight", "input"):
        if key not in override:
            continue
        if override[key] is None:
            raw[key] = None
        elif raw[key] is None:
            raw[key] = dict(override[key])
        else:
            changes = dict(override[key])
            if "granularity" in changes and "group_size" not in changes:
                changes["group_size"] = None
            if "dtype" in changes and "granularity" not in changes:
                changes.update(granularity=None, group_size=None)
            raw[key] = {**raw[key], **changes}
    return LayerSpec.from_dict(raw, where)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not allowed", f"use one of {', '.join(allowed)}")
