"""`fp16_products`: weight scales chosen so that a runtime dequantizing in fp16 and casting to
bf16 (GGUF Q8_0 / Q4_0 in diffusers and ComfyUI-GGUF) gets diffquant's weights bit for bit."""

from __future__ import annotations

import pytest
import torch

from diffquant.quant.errors import ConfigError
from diffquant.quant.formats.affine import FP16_PRODUCT_STEPS, fp16_product_scales
from diffquant.quant.spec import LayerSpec, TensorSpec, resolve_scale_dtype
from diffquant.quant.weights import quantize_weight
from diffquant.recipes import load_recipe

S0 = 1030 * 2.0**-20  # an fp16 value; 127 * S0 = 127.744140625 * 2^-10, whose fp16 rounding 127.75 * 2^-10 is a bf16 tie


def runtime_chain(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diffusers' Q8_0 dequantization (fp16 d times int8 q, in fp16) cast to bf16, as GGUFLinear does."""
    return (scale.half() * codes.to(torch.int8)).bfloat16()


def test_the_scale_steps_up_one_fp16_ulp_past_a_bf16_tie() -> None:
    x = torch.tensor([[[0.0, -3 * S0, 127 * S0]]])
    assert runtime_chain(torch.tensor(127), torch.tensor(S0)).item() == 128 * 2.0**-10  # the tie went to even
    assert (torch.tensor(127 * S0)).bfloat16().item() == 127.5 * 2.0**-10  # one rounding: the nearer value
    scale, left = fp16_product_scales(x, torch.full((1, 1, 1), S0), -128, 127, torch.bfloat16)
    assert (scale.item(), left) == (1031 * 2.0**-20, 0)
    # With no step allowed the group keeps its scale and is counted.
    kept, left = fp16_product_scales(x, torch.full((1, 1, 1), S0), -128, 127, torch.bfloat16, steps=0)
    assert (kept.item(), left) == (S0, 1)


def test_the_gguf_q8_0_recipe_gives_every_code_the_same_value_both_ways() -> None:
    recipe = load_recipe("gguf_q8_0").global_spec
    bf16 = resolve_scale_dtype(recipe, "bfloat16").weight
    assert bf16.fp16_products == "bfloat16" and bf16.scale_dtype == "float16" and bf16.group_size == 32
    assert resolve_scale_dtype(recipe, "float32").weight.fp16_products is None
    assert resolve_scale_dtype(recipe, "float16").weight.fp16_products is None

    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 1024, generator=generator) * 0.02).bfloat16().float()
    searched = quantize_weight(w, bf16)
    plain = quantize_weight(w, TensorSpec("int8", "per_group", 32, scale_dtype="float16"))
    s, s0 = searched.tensors["weight_scale"], plain.tensors["weight_scale"]
    assert torch.equal(s.half().float(), s) and torch.all(s >= s0)
    ulps = s.half().view(torch.int16).int() - s0.half().view(torch.int16).int()  # positive fp16 values: ulps apart
    assert int(ulps.max()) <= FP16_PRODUCT_STEPS and int((ulps > 0).sum()) > 0

    def moved(qw) -> int:
        codes, scale = qw.tensors["weight"].float(), qw.tensors["weight_scale"].repeat_interleave(32, dim=1)
        return int((runtime_chain(codes, scale) != qw.dequantize(torch.bfloat16)).sum())

    assert moved(plain) > 0.02 * w.numel()  # the plain fp16 scales: a few percent of the weights differ
    assert moved(searched) == 0


@pytest.mark.parametrize(("spec", "message"), [
    (dict(dtype="int8", granularity="per_group", group_size=32, fp16_products="bfloat16"), "scale_dtype float16"),
    (dict(dtype="fp8_e4m3", scale_dtype="float16", fp16_products="bfloat16"), "symmetric integer weights"),
    (dict(dtype="int8", scale_dtype="float16", fp16_products="float32"), "fp16_products 'float32'"),
])
def test_fp16_products_is_refused_where_it_means_nothing(spec, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TensorSpec(**spec)


def test_fp16_products_is_refused_on_inputs() -> None:
    with pytest.raises(ConfigError, match="drop fp16_products from the input spec"):
        LayerSpec(TensorSpec("int8"), TensorSpec("int8", scale_dtype="float16", fp16_products="bfloat16"))


def test_a_group_without_such_a_scale_keeps_its_own_and_is_reported(monkeypatch) -> None:
    import diffquant.quant.weights.affine as affine

    search = affine.fp16_product_scales
    monkeypatch.setattr(affine, "fp16_product_scales", lambda *args: search(*args, steps=0))  # the tie's group cannot step
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 127 * S0, -3 * S0
    spec = TensorSpec("int8", "per_group", 32, scale_dtype="float16", fp16_products="bfloat16")
    with pytest.warns(UserWarning, match="fp16_products: 1 of 1 weight groups found no fp16 scale within 64 steps"):
        qw = quantize_weight(w, spec)
    assert qw.tensors["weight_scale"].item() == S0


def test_an_unresolved_fp16_products_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fp16_products 'model' is resolved per layer"):
        quantize_weight(torch.ones(2, 32), load_recipe("gguf_q8_0").global_spec.weight)
