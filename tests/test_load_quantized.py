"""`diffquant.load_quantized`: a checkpoint into the user's own pipe or module, in place.

Resident memory equals the checkpoint's tensor bytes for every recipe and tiny family; the pipe
keeps working under `.to(dtype)`, model CPU offload and torch.compile; a checkpoint of another
architecture and `save_pretrained` are refused in one line; `diffquant.save` writes a checkpoint
that loads back bit for bit; a checkpoint loads wherever its base directory has moved.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

import diffquant
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import load_checkpoint_tensors
from diffquant.errors import ConfigError
from diffquant.models.loading import load_pipeline
from diffquant.models.presets import resolve_model
from diffquant.models.quantized import load_quantized_submodule, module_tensor_bytes
from diffquant.models.submodule import load_submodule
from diffquant.models.tiny import TINY_FAMILIES, tiny_pipeline_dir
from diffquant.paths import CONFIG_DIR
from diffquant.quant.modules import QuantizedLayer
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.eval.measure import submodule_output
from diffquant.stages.quantize import QuantizeSettings, quantize

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml"))
EVERY_RECIPE_AND_FAMILY = [(f"tiny-{family}", recipe) for family in TINY_FAMILIES for recipe in RECIPES]


def checkpoint_tensor_bytes(checkpoint: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_checkpoint_tensors(checkpoint).values())


def computed_buffer_bytes(module: torch.nn.Module) -> int:
    """Bytes of non-persistent buffers outside quantized layers (PixArt's and SD3's positional
    embeddings): computed at construction, in no checkpoint, the same before and after loading."""
    return sum(t.numel() * t.element_size() for m in module.modules() if not isinstance(m, QuantizedLayer)
               for name, t in m._buffers.items() if t is not None and name in m._non_persistent_buffers_set)


def held_out_sample(calib: Path, manifest: dict) -> dict:
    artifact = CalibrationArtifact(calib)
    held_out = manifest["calibration"]["holdout_sample_ids"][0]
    return artifact.sample(next(i for i, record in enumerate(artifact.records) if record.id == held_out))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.double(), approx.double()
    return 10 * math.log10(float(reference.pow(2).sum()) / float((reference - approx).pow(2).sum()))


def cast_sample(sample: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sample.items()}


@pytest.mark.parametrize(("model", "recipe"), EVERY_RECIPE_AND_FAMILY, ids=[f"{m}-{r}" for m, r in EVERY_RECIPE_AND_FAMILY])
def test_resident_bytes_equal_the_checkpoint_tensor_bytes(model: str, recipe: str, quantize_factory) -> None:
    result = quantize_factory(model, recipe)
    module = load_submodule(resolve_model(model))
    unquantized = module_tensor_bytes(module)
    report = diffquant.load_quantized(module, result.out, mode="auto")
    assert report.checkpoint_tensor_bytes == checkpoint_tensor_bytes(result.out)
    assert module_tensor_bytes(module) == report.resident_bytes == report.checkpoint_tensor_bytes + computed_buffer_bytes(module)
    if not recipe.startswith("svdquant"):  # a rank-32 branch on 64-wide tiny layers outweighs what 4 bits save
        assert report.resident_bytes < unquantized
    assert {layer.name for layer in report.execution.layers} == {entry["name"] for entry in result.manifest["layers"]}


def test_exact_mode_caches_one_float_copy_per_layer_and_dequant_none(quantize_factory) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    module, _ = load_quantized_submodule(result.out, mode="exact")
    layers = [m for m in module.modules() if isinstance(m, QuantizedLayer)]
    cache = sum(m.weight_shape.numel() * 4 for m in layers)  # float32 dequantized weights
    assert module_tensor_bytes(module) == checkpoint_tensor_bytes(result.out) + cache
    diffquant.load_quantized(module, result.out, mode="dequant")
    assert module_tensor_bytes(module) == checkpoint_tensor_bytes(result.out)


def test_every_mode_reproduces_stage_twos_output_sqnr(quantize_factory, private_calib) -> None:
    """The reloaded dequant path computes what stage two measured: the same held-out output SQNR,
    within 0.5 dB (auto may run native kernels, whose rounding differs within documented bounds)."""
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    sample = held_out_sample(private_calib("tiny-sdxl"), result.manifest)
    reference = submodule_output(load_submodule(resolve_model("tiny-sdxl"))(**sample))
    exact = submodule_output(load_quantized_submodule(result.out, mode="exact")[0](**sample))
    dequant = submodule_output(load_quantized_submodule(result.out, mode="dequant")[0](**sample))
    assert torch.equal(exact, dequant)  # the same float32 dequantization and fake-quant, the same GEMMs
    for mode in ("auto", "native"):
        out = submodule_output(load_quantized_submodule(result.out, mode=mode)[0](**sample))
        assert abs(sqnr_db(reference, out) - sqnr_db(reference, exact)) < 0.5, mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loads_into_a_pipe_of_any_compute_dtype(dtype: torch.dtype, quantize_factory, private_calib) -> None:
    result = quantize_factory("tiny-sdxl", "int8_weight_only")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"), torch_dtype=dtype)
    sample = cast_sample(held_out_sample(private_calib("tiny-sdxl"), result.manifest), dtype)
    with torch.inference_mode():
        reference = submodule_output(pipe.unet(**sample)).float()
    diffquant.load_quantized(pipe, result.out)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLayer)]
    assert layers and {m.compute_dtype for m in layers} == {dtype}
    assert {m.bias.dtype for m in layers if m.bias is not None} == {dtype}
    # Every stored tensor starts on a 64-byte boundary (safetensors hands out unaligned views, on
    # which torch's bf16 int8 weight-only kernel crashed).
    assert all(t.data_ptr() % 64 == 0 for m in layers for t in m.buffers())
    # Stored tensors keep the checkpoint's dtypes: int8 codes, float32 scales.
    assert {m.weight.dtype for m in layers} == {torch.int8} and {m.weight_scale.dtype for m in layers} == {torch.float32}
    with torch.inference_mode():
        out = submodule_output(pipe.unet(**sample))
    assert out.dtype == dtype
    # int8 weight-only on tiny-sdxl measures ~40 dB in float32; 16-bit arithmetic costs a few dB.
    assert sqnr_db(reference, out.float()) > 25


def test_pipe_to_a_dtype_keeps_stored_tensors_and_moves_the_compute_dtype(quantize_factory, private_calib) -> None:
    result = quantize_factory("tiny-sdxl", "fp8")
    module = load_submodule(resolve_model("tiny-sdxl"))
    diffquant.load_quantized(module, result.out, mode="dequant")
    before = {name: t.clone() for name, t in module.state_dict().items() if "weight_scale" in name or name.endswith(".weight")}
    module.to(torch.bfloat16).to(torch.float32)
    after = module.state_dict()
    quantized_codes = [name for name in before if after[name].dtype == torch.float8_e4m3fn]
    assert quantized_codes
    assert all(torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)) for name in quantized_codes)
    assert all(torch.equal(before[name], after[name]) for name in before if "weight_scale" in name)


def test_model_cpu_offload_and_compile_run_the_quantized_unet(quantize_factory, private_calib) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    diffquant.load_quantized(pipe, result.out, mode="dequant")
    sample = held_out_sample(private_calib("tiny-sdxl"), result.manifest)
    with torch.inference_mode():
        eager = submodule_output(pipe.unet(**sample))
    explanation = torch._dynamo.explain(pipe.unet)(**sample)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    compiled = torch.compile(pipe.unet, backend="eager")
    with torch.inference_mode():
        assert torch.equal(submodule_output(compiled(**sample)), eager)
    pipe.enable_model_cpu_offload(device="cpu")
    image = pipe("a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(quantize_factory) -> None:
    flux = quantize_factory("tiny-flux", "int8_w8a8")
    unet = load_submodule(resolve_model("tiny-sdxl"))
    with pytest.raises(ConfigError) as excinfo:
        diffquant.load_quantized(unet, flux.out)
    message = str(excinfo.value)
    assert "\n" not in message and "FluxTransformer2DModel" in message and "UNet2DConditionModel" in message
    pipe = load_pipeline(resolve_model("tiny-sdxl"))
    with pytest.raises(ConfigError, match="has no submodule 'transformer'"):
        diffquant.load_quantized(pipe, flux.out)


def test_save_pretrained_refuses_before_writing_anything_and_diffquant_save_round_trips(quantize_factory, tmp_path: Path) -> None:
    result = quantize_factory("tiny-sdxl", "svdquant_w4a4")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    diffquant.load_quantized(pipe, result.out, mode="dequant")
    for owner in (pipe, pipe.unet):
        with pytest.raises(ConfigError, match="diffquant.save"):
            owner.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    saved = diffquant.save(pipe.unet, tmp_path / "mine")
    original, reloaded = load_checkpoint_tensors(result.out), load_checkpoint_tensors(saved)
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k].view(torch.uint8), reloaded[k].view(torch.uint8)) for k in original if original[k].numel())
    fresh = load_submodule(resolve_model("tiny-sdxl"))
    diffquant.load_quantized(fresh, saved, mode="dequant")
    with pytest.raises(ConfigError, match="holds no diffquant checkpoint"):
        diffquant.save(load_submodule(resolve_model("tiny-sdxl")), tmp_path / "none")


def test_a_checkpoint_loads_after_its_base_directory_moved(tmp_path: Path) -> None:
    base = tmp_path / "my-model"
    shutil.copytree(tiny_pipeline_dir("sd15"), base)
    calibrate(CalibrationSettings(model=str(base), out=tmp_path / "calib", num_prompts=2, steps=2), show_progress=False)
    quantize(QuantizeSettings(calib=tmp_path / "calib", recipe="int8_weight_only", out=tmp_path / "q", device="cpu", holdout=1),
             show_progress=False)
    moved = tmp_path / "elsewhere" / "my-model"
    moved.parent.mkdir()
    base.rename(moved)
    pipe = DiffusionPipeline.from_pretrained(moved)
    report = diffquant.load_quantized(pipe, tmp_path / "q")
    assert report.target == "unet" and len(report.execution.layers) > 0
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_load_state_dict_into_a_layer_whose_kernel_repacked_its_weight_restores_the_checkpoint() -> None:
    """load_state_dict writes the checkpoint's layout; a kernel holding its own layout (int4) packs
    it again, so the layer computes and saves exactly what it did."""
    from diffquant.quant.kernels.select import set_execution
    from diffquant.quant.modules import QuantizedLinear
    from diffquant.quant.spec import TensorSpec
    from diffquant.quant.weights import quantize_weight

    weight = quantize_weight(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), TensorSpec("int4", "per_group", group_size=32))
    holder = torch.nn.Sequential(QuantizedLinear(weight, None, torch.float32))
    from diffquant.quant.kernels import KERNELS

    missing = KERNELS["torch._weight_int4pack_mm"].unsupported(holder[0])
    if missing is not None:  # a CPU build without the int4 kernel
        pytest.skip(missing)
    report = set_execution(holder, "native")
    assert report.layers[0].kernel == "torch._weight_int4pack_mm"
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    before, state = holder(x), {k: v.clone() for k, v in holder.state_dict().items()}
    holder.load_state_dict(state)
    assert torch.equal(holder(x), before)
    assert all(torch.equal(holder.state_dict()[k], v) for k, v in state.items())


def test_a_kernel_that_cannot_run_a_layer_is_refused_in_one_line() -> None:
    from diffquant.quant.kernels import KERNELS
    from diffquant.quant.modules import QuantizedLinear
    from diffquant.quant.spec import TensorSpec
    from diffquant.quant.weights import quantize_weight

    layer = QuantizedLinear(quantize_weight(torch.ones(16, 32), TensorSpec("nvfp4")), None, torch.float32)
    with pytest.raises(ConfigError, match=r"kernel torch._int_mm cannot run the \(16, 32\) nvfp4 g16 sym static/min_max layer") as excinfo:
        layer.set_kernel(KERNELS["torch._int_mm"])
    assert "\n" not in str(excinfo.value) and layer.kernel.name == "dequant"
