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
    ("int8_w8a8", "int8 per_tensor weights have no ModelOpt diffusers layout.*fp8 or nvfp4_static"),
    ("svdquant_w4a4", "NVFP4_SVD needs an NVFP4 residual with a static input scale.*int4 residual and dynamic inputs.*nvfp4_static"),
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


@pytest.mark.parametrize("algo", ["FP8", "NVFP4", "W4A16_NVFP4"])
def test_quantization_config_is_what_modelopts_converter_writes(algo: str) -> None:
    from diffquant.export.modelopt_layout import quantization_config

    source = {"producer": {"name": "diffquant", "version": "9"},
              "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["proj_out"], "group_size": 16}}  # fmt: skip
    assert quantization_config(algo, ["proj_out"], "9") == convert_hf_quant_config_format(source)
