"""GGUF export: read back with the `gguf` package's reader and dequantizers, and loaded with
diffusers' own GGUF backend in a process that never imports diffquant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.single_file_keys import original_layout
from diffquant.export.stored import StoredCheckpoint
from tests.helpers.export_checks import float_outputs, held_out_samples, outputs, run_without_diffquant, sqnr, to_plain

gguf = pytest.importorskip("gguf")

FP16_REL = 2.0**-11  # half an fp16 ulp, relative, in fp16's normal range

DIFFUSERS_LOAD = r"""
import sys, torch, diffusers
from safetensors.torch import save_file
from diffusers import GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
path, cls_name, config, subfolder, dtype, samples_path, out = sys.argv[1:]
cls = getattr(diffusers, cls_name)
model = cls.from_single_file(path, config=config, subfolder=subfolder, torch_dtype=getattr(torch, dtype),
                             quantization_config=GGUFQuantizationConfig(compute_dtype=getattr(torch, dtype))).eval()
weights = {name + ".weight": dequantize_gguf_tensor(m.weight).contiguous() for name, m in model.named_modules()
           if isinstance(m, GGUFLinear) and m.weight.quant_type not in (0, 1, 30)}
samples = torch.load(samples_path, weights_only=True)
with torch.inference_mode():
    for i, sample in enumerate(samples):
        result = model(**sample)
        weights[f"output.{i}"] = (result[0] if isinstance(result, tuple) else result.sample).float().contiguous()
save_file(weights, out)
assert "diffquant" not in sys.modules
print(len(weights))
"""

TARGETS = {"tiny-flux": ("flux-v1", "FluxTransformer2DModel", "transformer"),
           "tiny-sdxl": ("sdxl-v1", "UNet2DConditionModel", "unet"),
           "tiny-sd3": ("sd3-v1", "SD3Transformer2DModel", "transformer")}


def gguf_tensors(path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def expected_q_blocks(source: StoredCheckpoint, record) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float32, fp16-rounded scale per weight) straight from the checkpoint."""
    codes = source.int_codes(record).float()
    scale = source.scale_per_column(record).half().float()
    return codes, scale


@pytest.mark.parametrize(("recipe", "qtype", "qmax"), [("w4a16", "Q4_0", 8), ("int8_weight_only", "Q8_0", 127)])
def test_gguf_blocks_hold_diffquant_codes_with_fp16_scales(recipe, qtype, qmax, quantize_factory, tmp_path) -> None:
    result = quantize_factory("tiny-flux", recipe)
    report = export_checkpoint(result.out, "gguf", tmp_path / "m.gguf", names="diffusers")
    assert report.layers == {f"{qtype} exact": len(result.manifest["layers"])}
    source = StoredCheckpoint.read(result.out)
    tensors = gguf_tensors(tmp_path / "m.gguf")
    for record in source.layers:
        tensor = tensors[f"{record.name}.weight"]
        assert tensor.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(record.out_features, -1)
        codes, scale16 = expected_q_blocks(source, record)
        # gguf's reader computes float32(q) * float32(d): one correctly rounded product.
        assert torch.equal(got, codes * scale16)
        ours = source.dequantized(record).reshape(record.out_features, -1)
        scale = source.scale_per_column(record)
        assert torch.all((got - ours).abs() <= qmax * FP16_REL * scale.abs() * (1 + 2**-20))
    # Unquantized tensors are bit-exact (1-D ones upcast to F32, exactly).
    for name, tensor in source.tensors.items():
        if name.endswith("norm_q.weight"):
            assert torch.equal(torch.from_numpy(np.array(tensors[name].data)), tensor.float())


def test_gguf_mxfp4_blocks_are_diffquant_bit_for_bit(quantize_factory, tmp_path) -> None:
    result = quantize_factory("tiny-flux", "mxfp4")
    with pytest.raises(ConfigError, match="quant_type"):
        export_checkpoint(result.out, "gguf", tmp_path / "x.gguf")
    export_checkpoint(result.out, "gguf", tmp_path / "m.gguf", quant_type="MXFP4", names="diffusers")
    source = StoredCheckpoint.read(result.out)
    tensors = gguf_tensors(tmp_path / "m.gguf")
    for record in source.layers:
        tensor = tensors[f"{record.name}.weight"]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(record.out_features, -1)
        assert torch.equal(got, source.dequantized(record).reshape(record.out_features, -1))


def test_gguf_requantizes_with_gguf_own_quantizer_and_reports_the_error(quantize_factory, tmp_path) -> None:
    result = quantize_factory("tiny-flux", "int8_weight_only")
    report = export_checkpoint(result.out, "gguf", tmp_path / "m.gguf", quant_type="Q5_1", names="diffusers")
    assert report.layers == {"Q5_1 requantized": len(result.manifest["layers"])}
    assert sum("requantized int8 per_tensor -> Q5_1, weight SQNR" in note for note in report.notes) == len(result.manifest["layers"])
    source = StoredCheckpoint.read(result.out)
    tensors = gguf_tensors(tmp_path / "m.gguf")
    record = source.layers[0]
    ours = source.dequantized(record).reshape(record.out_features, -1).numpy()
    expected = gguf.quants.quantize(ours, gguf.GGMLQuantizationType.Q5_1)
    assert np.array_equal(np.array(tensors[f"{record.name}.weight"].data), expected)


def test_flux_original_names_fuse_the_diffusers_rows(quantize_factory, tmp_path) -> None:
    result = quantize_factory("tiny-flux", "w4a16")
    export_checkpoint(result.out, "gguf", tmp_path / "bfl.gguf")
    export_checkpoint(result.out, "gguf", tmp_path / "diffusers.gguf", names="diffusers")
    fused, split = gguf_tensors(tmp_path / "bfl.gguf"), gguf_tensors(tmp_path / "diffusers.gguf")
    assert "double_blocks.0.img_attn.qkv.weight" in fused and "transformer_blocks.0.attn.to_q.weight" not in fused
    assert len(fused) < len(split)
    rows = [np.array(split[f"single_transformer_blocks.1.{p}.weight"].data) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert np.array_equal(np.array(fused["single_blocks.1.linear1.weight"].data), np.concatenate(rows))
    norm = np.array(split["norm_out.linear.weight"].data)
    half = norm.shape[0] // 2
    assert np.array_equal(np.array(fused["final_layer.adaLN_modulation.1.weight"].data), np.concatenate([norm[half:], norm[:half]]))
    assert gguf.GGUFReader(str(tmp_path / "bfl.gguf")).fields["general.architecture"].contents() == "flux"


def test_flux_inverse_names_round_trip_through_diffusers_converter() -> None:
    # diffusers' converter hard-codes Flux.1's widths (3072 inner, 12288 MLP) for linear1's
    # split, so the round trip runs on a full-width state dict of [rows, 1] tensors.
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    diffusers_sd = {k: torch.randn(v.shape[0], 1, generator=generator) for k, v in model.state_dict().items()}
    layout = original_layout("flux", list(diffusers_sd))
    original = {}
    for tensor in layout:
        value = torch.cat([diffusers_sd[p] for p in tensor.parts])
        original[tensor.name] = torch.cat(value.chunk(2)[::-1]) if tensor.swap_halves else value
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[k], diffusers_sd[k]) for k in back)


@pytest.mark.parametrize(("model", "recipe"), [(m, "w4a16") for m in sorted(TARGETS)] + [("tiny-flux", "int8_weight_only"), ("tiny-flux", "gguf_q8_0")])
def test_diffusers_gguf_backend_loads_the_export(model, recipe, quantize_factory, private_calib, tmp_path) -> None:
    from diffquant.models.tiny import tiny_pipeline_dir

    result = quantize_factory(model, recipe)
    path = tmp_path / "m.gguf"
    report = export_checkpoint(result.out, "gguf", path, names="diffusers")
    folder, cls_name, subfolder = TARGETS[model]
    samples = held_out_samples(result, private_calib(model))
    torch.save([to_plain(s) for s in samples], tmp_path / "samples.pt")
    dtype = result.manifest["model"]["torch_dtype"]
    run_without_diffquant(DIFFUSERS_LOAD, str(path), cls_name, str(tiny_pipeline_dir(folder.split("-")[0])), subfolder, dtype,
                          str(tmp_path / "samples.pt"), str(tmp_path / "loaded.safetensors"))
    loaded = load_file(tmp_path / "loaded.safetensors")

    # diffusers dequantizes in fp16: fp16(q * d) with d = fp16(s), one more rounding than gguf's reader.
    source = StoredCheckpoint.read(result.out)
    linear = [r for r in source.layers if r.type == "Linear"]
    assert {f"{r.name}.weight" for r in linear} <= loaded.keys()
    for record in linear:
        codes, scale16 = expected_q_blocks(source, record)
        got = loaded[f"{record.name}.weight"].reshape(record.out_features, -1)
        assert got.dtype == torch.float16
        assert torch.equal(got, (codes * scale16).half())
    # GGUFLinear then casts that to the compute dtype. The export reports how many weights the two
    # roundings move off diffquant's single one; gguf_q8_0's scales are chosen so that none moves.
    compute = getattr(torch, dtype)
    moved = sum(int((loaded[f"{r.name}.weight"].to(compute).reshape(-1) != source.dequantized(r, compute).reshape(-1)).sum()) for r in linear)
    total = sum(r.out_features * r.in_features for r in linear)
    assert (moved == 0) == (recipe == "gguf_q8_0")
    assert [n for n in report.notes if "fp16 dequantization" in n] == [
        f"diffusers' and ComfyUI-GGUF's fp16 dequantization cast to {dtype} gives diffquant's weights bit for bit" if moved == 0 else
        f"diffusers' and ComfyUI-GGUF's fp16 dequantization cast to {dtype} moves {moved} of {total} weights ({100 * moved / total:.2f}%) "
        "off diffquant's (in a bf16 model the recipe gguf_q8_0 chooses scales where it moves none)"]

    runtime = [loaded[f"output.{i}"] for i in range(len(samples))]
    reference = float_outputs(model, samples)
    ours = outputs(result.model, samples)
    # GGUFLinear runs with fp16(q * d) cast to the compute dtype: for Q8_0 in a bf16 model that is a
    # second rounding of 8-bit codes times an 11-bit scale into bf16's 8-bit significand. For
    # int8_weight_only's per-tensor scale it moves 5.5% of tiny-flux's weights and the output SQNR
    # by 0.79 dB (measured); Q4_0 stays within 0.1 dB; gguf_q8_0 moves no weight, so the forwards
    # are the same computation (0.000 dB apart, measured).
    tolerance = 1.0 if recipe == "int8_weight_only" else 0.01 if recipe == "gguf_q8_0" else 0.1
    assert abs(sqnr(reference, runtime) - sqnr(reference, ours)) < tolerance


@pytest.mark.parametrize(("recipe", "message"), [
    ("int8_w8a8", "weight-only.*static input scales.*int8_weight_only"),
    ("w4a4", "weight-only.*dynamic.*w4a16"),
    ("svdquant_w4a16", "low-rank branch.*w4a16"),
])
def test_gguf_refuses_what_it_cannot_carry(recipe, message, quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory("tiny-flux", recipe).out, "gguf", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_refuses_k_quants_and_unknown_names(quantize_factory, tmp_path) -> None:
    out = quantize_factory("tiny-flux", "w4a16").out
    with pytest.raises(ConfigError, match="K-quants"):
        export_checkpoint(out, "gguf", tmp_path / "m.gguf", quant_type="Q4_K")
    with pytest.raises(ConfigError, match="names="):
        export_checkpoint(out, "gguf", tmp_path / "m.gguf", names="bfl")


def test_export_docstring_examples_run() -> None:
    import doctest

    import diffquant.export.gguf_file as gguf_file
    import diffquant.export.nunchaku_lite as nunchaku_lite
    import diffquant.export.nunchaku_pack as nunchaku_pack
    import diffquant.export.quark_layout as quark_layout
    import diffquant.export.single_file_keys as single_file_keys
    import diffquant.export.stored as stored
    import diffquant.export.torchao_layout as torchao_layout

    for module in (gguf_file, nunchaku_lite, nunchaku_pack, quark_layout, single_file_keys, stored, torchao_layout):
        failures, tried = doctest.testmod(module)
        assert failures == 0 and tried > 0, module.__name__
