"""modelopt export: byte for byte against nvidia-modelopt's own export functions on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffquant import __version__
from diffquant.errors import ConfigError
from diffquant.export.common import read_checkpoint
from diffquant.models.tiny import tiny_pipeline_dir
from diffquant.stages.export import export

pytest.importorskip("modelopt")
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format  # noqa: E402
from modelopt.torch.export.diffusers_utils import get_qkv_group_key, is_qkv_projection  # noqa: E402
from modelopt.torch.export.quant_utils import to_quantized_weight  # noqa: E402
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402


def _original_weights(family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import diffusers

    cls, sub = (diffusers.FluxTransformer2DModel, "transformer") if family == "flux" else (diffusers.UNet2DConditionModel, "unet")
    return cls.from_pretrained(tiny_pipeline_dir(family), subfolder=sub, torch_dtype=dtype).state_dict()


def _modelopt_groups(names: list[str]) -> dict[str, list[str]]:
    """ModelOpt's own qkv grouping (`is_qkv_projection`, `get_qkv_group_key`) among modules that
    read one input: in a UNet cross-attention (attn2) to_q reads the image, to_k / to_v the text."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if is_qkv_projection(name) and not (name.endswith("attn2.to_q")):
            groups.setdefault(get_qkv_group_key(name), []).append(name)
    return {key: members for key, members in groups.items() if len(members) > 1}


@pytest.mark.parametrize(("model", "recipe", "algo"), [("tiny-flux", "fp8", "FP8"), ("tiny-flux", "nvfp4_static", "NVFP4"), ("tiny-sdxl", "fp8", "FP8")])
def test_modelopt_export_matches_modelopt_packing_byte_for_byte(quantize_factory, tmp_path: Path, model: str, recipe: str, algo: str) -> None:
    result = quantize_factory(model, recipe)
    contents = read_checkpoint(result.out)
    out = tmp_path / "transformer"
    report = export(result.out, "modelopt", out)
    assert report.layers == {algo: len(contents.layers)}

    # config.json: the model's config plus the quantization_config ModelOpt's converter writes
    config = json.loads((out / "config.json").read_text())
    ignore = sorted(entry["name"] for entry in contents.manifest["skipped"])
    expected = convert_hf_quant_config_format({"producer": {"name": "diffquant", "version": __version__},
                                               "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None,
                                                                "exclude_modules": ignore, "group_size": 16}})  # fmt: skip
    assert config.pop("quantization_config") == expected
    sub = "transformer" if contents.family == "flux" else "unet"
    assert config == json.loads((tiny_pipeline_dir(contents.family) / sub / "config.json").read_text())
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        ours = {k: handle.get_tensor(k) for k in handle.keys()}
        assert json.loads(handle.metadata()["quantization_config"]) == expected
    # ModelOpt packs in the weight's dtype; a bf16 weight / fp32 scale is rounded to bf16 before
    # the fp8 cast (a second rounding), so the comparison feeds both sides the float32 weight.
    dtype = getattr(torch, contents.manifest["model"]["torch_dtype"])  # the weights diffquant quantized
    originals = {k: v.float() for k, v in _original_weights(contents.family, dtype).items()}
    global_amax: dict[str, torch.Tensor] = {}
    for members in _modelopt_groups(list(contents.layers)).values():
        shared = torch.stack([originals[f"{m}.weight"].abs().amax() for m in members]).amax()
        global_amax.update({m: shared for m in members})
    for name, record in contents.layers.items():
        weight = originals[f"{name}.weight"]
        if algo == "FP8":
            # ModelOpt's scale: amax.item() / 448 in float64, then float32 (ours divides in float32:
            # the two agree or differ by the float32 rounding of the same quotient, 2^-24 relative)
            scale = torch.tensor(weight.abs().amax().item() / 448.0)
            assert ours[f"{name}.weight_scale"].dtype == torch.float32
            assert abs(ours[f"{name}.weight_scale"].item() - scale.item()) <= scale.item() * 2.0**-24
            theirs = to_quantized_weight(weight.reshape(record.shape), ours[f"{name}.weight_scale"], "fp8")
            assert torch.equal(ours[f"{name}.weight"].view(torch.uint8), theirs.view(torch.uint8)), name
            assert torch.equal(ours[f"{name}.input_scale"], contents.input_params(record)["input_scale"].reshape(()))
            continue
        amax = global_amax.get(name, weight.abs().amax())
        scale_2 = amax.float() / (6.0 * 448.0)  # NVFP4QTensor.get_weights_scaling_factor_2 on the group
        block_scale = NVFP4QTensor.get_weights_scaling_factor(weight, 16, scale_2)[0]
        theirs = to_quantized_weight(weight, block_scale, "nvfp4", scale_2, 16)
        assert torch.equal(ours[f"{name}.weight_scale_2"], scale_2), name
        assert torch.equal(ours[f"{name}.weight_scale"].view(torch.uint8), block_scale.view(torch.uint8)), name
        assert torch.equal(ours[f"{name}.weight"], theirs), name
        assert torch.equal(ours[f"{name}.input_scale"], contents.input_params(record)["input_scale_2"].reshape(()))
    plain = contents.plain_tensors()
    assert all(torch.equal(ours[k], v) for k, v in plain.items())


@pytest.mark.parametrize(("recipe", "message"), [
    ("nvfp4", "static NVFP4 input scale.*nvfp4_static"),
    ("int8_w8a8", "int8 per_tensor weights have no ModelOpt diffusers layout.*fp8, nvfp4_static or svdquant_nvfp4_static"),
    ("svdquant_w4a4", "NVFP4_SVD needs an NVFP4 residual with a static NVFP4 input scale.*int4 residual and dynamic inputs.*svdquant_nvfp4_static"),
])
def test_modelopt_refuses_what_it_cannot_carry(quantize_factory, tmp_path: Path, recipe: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export(quantize_factory("tiny-flux", recipe).out, "modelopt", tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()


def test_modelopt_qkv_group_shares_nvfp4_scales_like_modelopt() -> None:
    from diffquant.export import ExportReport
    from diffquant.export.modelopt_layout import _shared_nvfp4_scales, modelopt_tensors
    from diffquant.quant.weights import QuantizedWeight
    from diffquant.quant.spec import TensorSpec
    from tests.helpers.export_runtime import synthetic_contents

    gen = torch.Generator().manual_seed(1)
    weights = {"b.attn.to_q": torch.randn(4, 32, generator=gen) * 3, "b.attn.to_k": torch.randn(4, 32, generator=gen), "b.attn.to_out.0": torch.randn(4, 32, generator=gen)}
    spec = TensorSpec(dtype="nvfp4")
    contents = synthetic_contents(weights, spec)
    report = ExportReport(format="modelopt", out=Path("."))
    shared = _shared_nvfp4_scales(contents, report)
    assert set(shared) == {"b.attn.to_k"} and "b.attn.to_k: requantized" in report.notes[0]
    # ModelOpt's preprocess_linear_fusion: one weight amax (the largest) for the group
    scale_2 = weights["b.attn.to_q"].abs().amax() / (6.0 * 448.0)
    for name in ("b.attn.to_q", "b.attn.to_k"):
        record = contents.layers[name]
        ours = modelopt_tensors(contents, record, shared.get(name))
        assert torch.equal(ours[f"{name}.weight_scale_2"], scale_2)
        # what ModelOpt writes for this weight with that scale: the original for q (its own scale),
        # diffquant's dequantized weight for k (the weight the checkpoint holds)
        weight = weights[name] if name == "b.attn.to_q" else QuantizedWeight(spec, torch.Size((4, 32)), contents.stored(record)).dequantize(torch.float32)
        block_scale = NVFP4QTensor.get_weights_scaling_factor(weight, 16, scale_2)[0]
        assert torch.equal(ours[f"{name}.weight_scale"].view(torch.uint8), block_scale.view(torch.uint8)), name
        assert torch.equal(ours[f"{name}.weight"], to_quantized_weight(weight, block_scale, "nvfp4", scale_2, 16)), name


@pytest.mark.parametrize("algo", ["FP8", "NVFP4", "W4A16_NVFP4", "NVFP4_SVD"])
def test_quantization_config_is_what_modelopts_converter_writes(algo: str) -> None:
    from diffquant.export.modelopt_layout import quantization_config

    rank = 32 if algo == "NVFP4_SVD" else None
    source = {"producer": {"name": "diffquant", "version": "9"},
              "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["proj_out"], "group_size": 16,
                               **({"lora_rank": rank} if rank else {})}}  # fmt: skip
    assert quantization_config(algo, ["proj_out"], "9", rank) == convert_hf_quant_config_format(source)


class ModelOptSVDLinear(torch.nn.Module):
    """ModelOpt's NVFP4_SVD layer computed by ModelOpt's own code from the exported tensors:
    `SVDQuantLinear.forward` (x' = x * pre_quant_scale in x's dtype; NVFP4 GEMM of x' plus
    (x' lora_a^T) lora_b^T), the weight dequantized by `NVFP4QTensor.dequantize`, x' quantized
    by `NVFP4QTensor.quantize` with the static `input_scale` as its per-tensor scale; the GEMMs in
    the model's dtype, as the fake-quantized `SVDQuantLinear` runs them."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        packed = tensors[f"{name}.weight"]
        shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
        self.weight = NVFP4QTensor(shape, torch.float32, packed).dequantize(
            torch.float32, scale=tensors[f"{name}.weight_scale"], double_scale=tensors[f"{name}.weight_scale_2"], block_sizes={-1: 16})
        self.input_scale = tensors[f"{name}.input_scale"]
        self.pre_quant_scale = tensors[f"{name}.pre_quant_scale"]
        self.lora_a, self.lora_b = tensors[f"{name}.svdquant_lora_a"], tensors[f"{name}.svdquant_lora_b"]
        self.bias = tensors.get(f"{name}.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x * self.pre_quant_scale
        lora = torch.nn.functional.linear(torch.nn.functional.linear(xs, self.lora_a), self.lora_b)
        q, block_scale, _ = NVFP4QTensor.quantize(xs.float(), 16, weights_scaling_factor_2=self.input_scale)
        # a fake-quantized ModelOpt layer computes in the module's dtype: dequantized x' and W in it
        xq = q.dequantize(torch.float32, scale=block_scale, double_scale=self.input_scale, block_sizes={-1: 16}).to(x.dtype)
        return torch.nn.functional.linear(xq, self.weight.to(x.dtype), self.bias) + lora


def test_modelopt_nvfp4_svd_is_modelopt_packing_and_forward(quantize_factory, private_calib, tmp_path: Path) -> None:
    import diffusers

    from diffquant.export.keys import qkv_groups
    from tests.helpers.export_checks import float_outputs, held_out_samples, outputs, sqnr

    result = quantize_factory("tiny-flux", "svdquant_nvfp4_static")
    contents = read_checkpoint(result.out)
    out = tmp_path / "transformer"
    report = export(result.out, "modelopt", out)
    assert report.layers == {"NVFP4_SVD": len(contents.layers)}
    assert not any("requantized" in note for note in report.notes)  # share_groups: qkv, nothing to requantize

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    ignore = sorted(entry["name"] for entry in contents.manifest["skipped"])
    assert config == convert_hf_quant_config_format({"producer": {"name": "diffquant", "version": __version__},
                                                     "quantization": {"quant_algo": "NVFP4_SVD", "kv_cache_quant_algo": None, "exclude_modules": ignore,
                                                                      "group_size": 16, "lora_rank": 32}})  # fmt: skip
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        ours = {k: handle.get_tensor(k) for k in handle.keys()}
    dtype = torch.bfloat16
    svd_layers = [name for name, record in contents.layers.items() if record.svd is not None]
    assert svd_layers and len(svd_layers) < len(contents.layers)  # the modulation linears are svd_exclude'd
    for name, record in contents.layers.items():
        # ModelOpt's packing of the residual diffquant holds, with its weight_scale_2, is our bytes.
        # A code 8 (-0) is what a small negative residual rounds to, in ModelOpt's `_cast_fp4` as in
        # ours; it dequantizes to -0.0, which ModelOpt packs as code 0, so ModelOpt gets -2^-100 there.
        residual = contents.dequantized(record)
        residual = torch.where((residual == 0) & residual.signbit(), torch.tensor(-(2.0**-100)), residual)
        scale_2 = ours[f"{name}.weight_scale_2"]
        block_scale = NVFP4QTensor.get_weights_scaling_factor(residual, 16, scale_2)[0]
        assert torch.equal(ours[f"{name}.weight_scale"].view(torch.uint8), block_scale.view(torch.uint8)), name
        assert torch.equal(ours[f"{name}.weight"], to_quantized_weight(residual, block_scale, "nvfp4", scale_2, 16)), name
        assert torch.equal(ours[f"{name}.input_scale"], contents.input_params(record)["input_scale_2"].reshape(()))
        if record.svd is None:
            assert torch.equal(ours[f"{name}.pre_quant_scale"], torch.ones(record.in_features, dtype=dtype))
            assert not ours[f"{name}.svdquant_lora_a"].any() and not ours[f"{name}.svdquant_lora_b"].any()
            assert ours[f"{name}.svdquant_lora_a"].shape == (32, record.in_features)
            continue
        svd = {suffix: contents.tensors[key] for suffix, key in record.svd.tensors.items()}
        # pre_quant_scale: 1 / smooth_factor, one rounding to bf16 (half an ulp: 2^-8 relative)
        exact = 1.0 / svd["smooth_factor"].double()
        assert ours[f"{name}.pre_quant_scale"].dtype == dtype
        assert torch.all((ours[f"{name}.pre_quant_scale"].double() - exact).abs() <= exact * 2.0**-8)
        assert torch.equal(ours[f"{name}.svdquant_lora_a"], svd["lora_down"]) and torch.equal(ours[f"{name}.svdquant_lora_b"], svd["lora_up"])
    # ModelOpt's fused layout: each q/k/v group holds one pre_quant_scale, lora_a, weight_scale_2 and input_scale
    groups = [g for g in qkv_groups(contents.layers) if all(contents.layers[m].svd is not None for m in g)]
    assert len(groups) == 6  # tiny-flux: 2 double blocks x (image, context) + 2 single blocks
    for group in groups:
        for suffix in ("pre_quant_scale", "svdquant_lora_a", "weight_scale_2", "input_scale"):
            assert all(torch.equal(ours[f"{group[0]}.{suffix}"], ours[f"{m}.{suffix}"]) for m in group[1:]), (group, suffix)

    # The outputs of ModelOpt's forward over these tensors against diffquant's, on held-out samples
    model = diffusers.FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir("flux"), subfolder="transformer", torch_dtype=dtype).eval()
    for name in contents.layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ModelOptSVDLinear(ours, name))
    missing, unexpected = model.load_state_dict({k: v for k, v in ours.items() if k.rpartition(".")[0] not in contents.layers}, strict=False)
    assert not missing and not unexpected
    samples = held_out_samples(result, private_calib("tiny-flux"))
    reference = float_outputs("tiny-flux", samples)
    runtime, diffquant_sqnr = sqnr(reference, outputs(model, samples)), sqnr(reference, outputs(result.model, samples))
    assert abs(runtime - diffquant_sqnr) < 0.1, (runtime, diffquant_sqnr)


def test_modelopt_nvfp4_svd_refuses_qkv_parts_smoothed_apart(quantize_factory, private_calib, tmp_path: Path) -> None:
    import yaml

    from diffquant.paths import CONFIG_DIR

    raw = yaml.safe_load((CONFIG_DIR / "quant" / "svdquant_nvfp4_static.yaml").read_text())
    raw.update(name="svdquant_nvfp4_static_apart", share_groups="none")
    recipe = tmp_path / "svdquant_nvfp4_static_apart.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="different SVDQuant smooth_factors.*share_groups: qkv"):
        export(quantize_factory("tiny-flux", str(recipe)).out, "modelopt", tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()
