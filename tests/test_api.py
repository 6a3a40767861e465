"""diffquant.calibrate / diffquant.quantize on live pipes and modules (tiny random-weight models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler
from PIL import Image

import diffquant
from diffquant.api import resolve_recipe
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import load_checkpoint_tensors
from diffquant.errors import ArtifactError, ConfigError
from diffquant.models.live import state_sha256, value_sha256
from diffquant.models.quantized import MANIFEST_ATTRIBUTE
from diffquant.models.tiny import tiny_pipeline_dir
from diffquant.prompts import load_prompts
from diffquant.quant.modules import QuantizedLayer
from diffquant.recipes import load_recipe
from diffquant.stages.quantize import QuantizeSettings, quantize as quantize_stage

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
SMALL = {"height": 64, "width": 64, "show_progress": False}


def tiny_pipe(family: str = "sdxl", cls=DiffusionPipeline):
    pipe = cls.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def changed_pipe():
    """A tiny SDXL changed in memory: another scheduler and one weight scaled in place."""
    pipe = tiny_pipe()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pipe.unet.down_blocks[1].attentions[0].proj_in.weight.mul_(1.25)
    return pipe


def all_samples(path) -> list[dict]:
    artifact = CalibrationArtifact(path)
    return [artifact.sample(i) for i in range(len(artifact.records))]


def assert_samples_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        flat_x, spec_x = torch.utils._pytree.tree_flatten(x)
        flat_y, spec_y = torch.utils._pytree.tree_flatten(y)
        assert spec_x == spec_y
        assert all(torch.equal(s, t) if isinstance(s, torch.Tensor) else s == t for s, t in zip(flat_x, flat_y))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(changed pipe, its artifact) calibrated once: 3 prompts x 2 steps."""
    pipe = changed_pipe()
    out = tmp_path_factory.mktemp("live") / "calib"
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS, out, num_inference_steps=2, guidance_scale=8.0, **SMALL)
    return pipe, result


def test_live_artifact_records_the_pipe_as_changed(live):
    pipe, result = live
    manifest = result.manifest
    assert manifest["status"] == "complete" and manifest["num_samples"] == 6
    assert manifest["pipeline"]["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"
    assert manifest["pipeline"]["scheduler"]["config"]["num_train_timesteps"] == pipe.scheduler.config.num_train_timesteps
    assert manifest["model"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert manifest["model"]["target_state_sha256"] == state_sha256(pipe.unet)
    assert manifest["model"]["family"] == "sdxl"
    assert manifest["model"]["quant_exclude"] == ["*conv_in*", "*conv_out*", "*time_embedding*", "*add_embedding*"]
    assert manifest["prompts"]["list"] == PROMPTS


def test_calling_again_returns_the_finished_artifact_and_other_arguments_are_refused(live):
    pipe, result = live
    again = diffquant.calibrate(pipe, "unet", PROMPTS, result.out, num_inference_steps=2, guidance_scale=8.0, **SMALL)
    assert again.already_complete and again.manifest == result.manifest
    with pytest.raises(ArtifactError, match=r"other settings \(pipeline_kwargs differ\)"):
        diffquant.calibrate(pipe, pipe.unet, PROMPTS, result.out, num_inference_steps=2, guidance_scale=5.0, **SMALL)


def test_live_capture_of_an_unchanged_pipe_equals_the_cli_stage(calib_factory, tmp_path):
    """The same model, prompts, steps and kwargs captured from a live pipe give the CLI stage's samples, bit for bit."""
    cli = calib_factory("tiny-sdxl", num_prompts=3, steps=2)
    pipe = tiny_pipe()
    prompts = load_prompts("builtin", num_prompts=3)
    result = diffquant.calibrate(pipe, pipe.unet, prompts, tmp_path / "c", num_inference_steps=2, guidance_scale=8.0, **SMALL)
    assert_samples_equal(all_samples(result.out), all_samples(cli))


def test_resume_after_a_failure_ends_with_the_uninterrupted_samples(live, tmp_path):
    pipe, result = live
    calls = []

    def fail_in_third_prompt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")

    handle = pipe.unet.register_forward_pre_hook(fail_in_third_prompt, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", num_inference_steps=2, guidance_scale=8.0, shard_size_mb=1e-4, **SMALL)
    finally:
        handle.remove()
    resumed = diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", num_inference_steps=2, guidance_scale=8.0, shard_size_mb=1e-4, **SMALL)
    assert resumed.resumed_from_prompt == 2 and not resumed.already_complete
    assert_samples_equal(all_samples(resumed.out), all_samples(result.out))


def test_a_target_the_pipe_never_calls_is_one_line(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(ConfigError, match=r"StableDiffusionXLPipeline\(\.\.\.\) never called its 'vae' \(AutoencoderKL\) — pass the submodule"):
        diffquant.calibrate(pipe, pipe.vae, PROMPTS[:1], tmp_path / "c", num_inference_steps=1, **SMALL)


def test_bad_arguments_are_one_line(tmp_path):
    pipe = tiny_pipe()
    with pytest.raises(ConfigError, match="prompt_kwargs has 2 entries for 3 prompts — give one dict per prompt"):
        diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", prompt_kwargs=[{}, {}], **SMALL)
    with pytest.raises(ConfigError, match="has no component 'Linear' to calibrate"):
        diffquant.calibrate(pipe, torch.nn.Linear(2, 2), PROMPTS, tmp_path / "c", **SMALL)
    with pytest.raises(ConfigError, match=r"takes no argument guidance — pass keywords of StableDiffusionXLPipeline.__call__ with keyword, e.g. height"):
        diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", guidance=3.0, **SMALL)
    with pytest.raises(ConfigError, match="keyword generator is decided by diffquant itself — drop it"):
        diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", generator=None, **SMALL)
    assert not (tmp_path / "c").exists()


def _images(count: int, size: int = 64) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()) for _ in range(count)]


def test_img2img_calibrates_with_one_image_per_prompt(tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = tiny_pipe(cls=StableDiffusionXLImg2ImgPipeline)
    images = _images(3)
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", num_inference_steps=4, strength=0.5,
                                 prompt_kwargs=[{"image": image} for image in images], show_progress=False)
    # strength 0.5 of 4 steps denoises the last 2 (diffusers' img2img timestep rule).
    assert result.manifest["num_samples"] == 6
    assert result.manifest["pipeline"]["prompt_kwargs_sha256"] == value_sha256([{"image": image} for image in images])
    first_latents = [s["sample"] for s in all_samples(result.out)[::2]]
    assert not torch.equal(first_latents[0], first_latents[1])
    with pytest.raises(ArtifactError, match="other settings"):  # another image for one prompt is another run
        diffquant.calibrate(pipe, pipe.unet, PROMPTS, tmp_path / "c", num_inference_steps=4, strength=0.5,
                            prompt_kwargs=lambda i: {"image": images[(i + 1) % 3]}, show_progress=False)


def test_inpaint_calibrates_with_images_and_masks(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = tiny_pipe("sd15", cls=StableDiffusionInpaintPipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # PNDM's warm-up would add a call per prompt
    images, masks = _images(2), [Image.new("L", (64, 64), 255 * (i % 2)) for i in range(2)]
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS[:2], tmp_path / "c", num_inference_steps=2,
                                 prompt_kwargs=lambda i: {"image": images[i], "mask_image": masks[i]}, **SMALL)
    assert result.manifest["num_samples"] == 4 and result.manifest["model"]["family"] == "sd15"


def test_controlnet_captures_the_unet_with_its_residuals(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_pipe("sd15")
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    pipe = StableDiffusionControlNetPipeline(**{**base.components, "scheduler": DDIMScheduler.from_config(base.scheduler.config)}, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    controls = _images(2)
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS[:2], tmp_path / "c", num_inference_steps=2,
                                 prompt_kwargs=[{"image": image} for image in controls], **SMALL)
    sample = all_samples(result.out)[0]
    assert result.manifest["num_samples"] == 4
    assert len(sample["down_block_additional_residuals"]) == len(controlnet.controlnet_down_blocks)
    assert sample["mid_block_additional_residual"] is not None


def test_a_pipeline_subclass_with_its_own_argument(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    class BrighterPipeline(StableDiffusionXLPipeline):
        def __call__(self, prompt=None, brightness: float = 0.0, **kwargs):
            self.seen = brightness
            return super().__call__(prompt, **kwargs)

    pipe = tiny_pipe(cls=BrighterPipeline)
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS[:1], tmp_path / "c", num_inference_steps=2, brightness=0.5, **SMALL)
    assert pipe.seen == 0.5 and result.manifest["num_samples"] == 2
    assert result.manifest["model"]["pipeline_class"] == "BrighterPipeline"


@pytest.fixture(scope="module")
def quantized_live(live, tmp_path_factory):
    """The live pipe's unet quantized in place (int8_w8a8, 2 held out) from a private copy of the artifact."""
    pipe, result = live
    calib = tmp_path_factory.mktemp("q") / "calib"
    shutil.copytree(result.out, calib)
    before = {name: module.weight.detach().clone() for name, module in pipe.unet.named_modules() if isinstance(module, torch.nn.Linear)}
    unet = diffquant.quantize(pipe.unet, calib, "int8_w8a8", holdout=2)
    return pipe, unet, calib, before


def test_quantize_replaces_the_layers_of_the_live_module_in_place(quantized_live):
    pipe, unet, calib, before = quantized_live
    assert unet is pipe.unet
    manifest = getattr(unet, MANIFEST_ATTRIBUTE)
    layers = {layer["name"] for layer in manifest["layers"]}
    modules = dict(unet.named_modules())
    assert layers and all(isinstance(modules[name], QuantizedLayer) for name in layers)
    assert "conv_in" in {s["name"] for s in manifest["skipped"]}  # the sdxl family's excludes apply
    name = "down_blocks.1.attentions.0.proj_in"  # the weight scaled in place is the one quantized
    layer = modules[name]
    scale = float(layer.weight_scale)
    assert scale == pytest.approx(float(before[name].abs().max()) / 127.5, rel=1e-6)  # half_span: amax / ((127 + 128) / 2)
    assert torch.equal(layer.weight, torch.round(before[name] / layer.weight_scale).clamp(-128, 127).to(torch.int8))
    assert manifest["calibration"]["num_calibration_samples"] == 4
    image = pipe("a cat", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_save_after_quantize_loads_back_bit_exact(quantized_live, tmp_path):
    pipe, unet, calib, _ = quantized_live
    diffquant.save(unet, tmp_path / "ckpt")
    fresh = changed_pipe()
    diffquant.load_quantized(fresh, tmp_path / "ckpt", mode="dequant")
    kernels = {name: module.kernel.name for name, module in unet.named_modules() if isinstance(module, QuantizedLayer)}
    assert kernels == {name: module.kernel.name for name, module in fresh.unet.named_modules() if isinstance(module, QuantizedLayer)}
    sample = CalibrationArtifact(calib).sample(0)  # the same stored tensors through the same kernel: the same output
    with torch.no_grad():
        assert torch.equal(fresh.unet(**sample)[0], unet(**sample)[0])


def test_stats_cache_is_reused_by_the_next_quantize(quantized_live):
    _, unet, calib, _ = quantized_live
    first = getattr(unet, MANIFEST_ATTRIBUTE)["stats_cache"]
    assert first["enabled"] and first["computed"] and first["hits"] == []
    again = diffquant.quantize(changed_pipe().unet, calib, "int8_w8a8", holdout=2)
    report = getattr(again, MANIFEST_ATTRIBUTE)["stats_cache"]
    assert report["computed"] == [] and report["hits"] == first["computed"]
    assert getattr(again, MANIFEST_ATTRIBUTE)["layers"] == getattr(unet, MANIFEST_ATTRIBUTE)["layers"]


def test_quantize_refuses_a_module_that_is_not_the_one_calibrated(live, tmp_path):
    _, result = live
    with pytest.raises(ArtifactError, match="differs in its weights"):
        diffquant.quantize(tiny_pipe().unet, result.out, "int8_w8a8", holdout=2)  # the base, not the edited unet
    with pytest.raises(ArtifactError, match="differs in its config"):
        diffquant.quantize(tiny_pipe("sd15").unet, result.out, "int8_w8a8", holdout=2)
    with pytest.raises(ArtifactError, match="differs in its weights"):  # the CLI stage loads the base weights
        quantize_stage(QuantizeSettings(calib=result.out, recipe="int8_w8a8", out=tmp_path / "q", device="cpu", holdout=2), show_progress=False)
    with pytest.raises(ConfigError, match="quantize\\(\\) takes no argument steps — selection keywords are limit"):
        diffquant.quantize(tiny_pipe().unet, result.out, "int8_w8a8", steps=3)


def test_live_quantize_with_out_equals_the_cli_checkpoint(calib_factory, tmp_path):
    calib = tmp_path / "calib"
    shutil.copytree(calib_factory("tiny-sdxl", num_prompts=3, steps=2), calib, ignore=shutil.ignore_patterns("stats"))
    cli = quantize_stage(QuantizeSettings(calib=calib, recipe="w4a16", out=tmp_path / "cli", device="cpu", holdout=2, use_stats_cache=False), show_progress=False)
    diffquant.quantize(tiny_pipe().unet, calib, "w4a16", out=tmp_path / "api", holdout=2, use_stats_cache=False)
    a, b = load_checkpoint_tensors(cli.out, "cpu"), load_checkpoint_tensors(tmp_path / "api", "cpu")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_objects_validate_like_yaml():
    shipped = load_recipe("svdquant_w4a4")
    typed = resolve_recipe(diffquant.Recipe(name=shipped.name, global_spec=shipped.global_spec, exclude=shipped.exclude,
                                            svdquant=shipped.svdquant, calibration=shipped.calibration))
    assert (typed.global_spec, typed.svdquant, typed.exclude, typed.calibration) == (shipped.global_spec, shipped.svdquant, shipped.exclude, shipped.calibration)
    static = diffquant.LayerSpec(weight=diffquant.TensorSpec("int4", "per_group", 64), input=diffquant.TensorSpec("int4", "per_group", 64))
    raw = {"name": "bad", "global": static.to_dict(), "algorithms": [{"name": "svdquant"}]}
    with pytest.raises(ConfigError) as from_yaml:
        resolve_recipe(raw)
    with pytest.raises(ConfigError) as from_object:
        resolve_recipe(diffquant.Recipe(name="bad", global_spec=static, svdquant=diffquant.SVDQuantConfig()))
    assert str(from_object.value) == str(from_yaml.value) == (
        "recipe bad: svdquant smooths inputs, so a static input scale must be the symmetric min_max range of x / s, per tensor — "
        "set global.input.dynamic: true, or use a symmetric per_tensor (or nvfp4) static input with observer min_max")
    with pytest.raises(ConfigError, match="recipe of type int is not allowed"):
        resolve_recipe(3)


def test_exclude_mode_replace_drops_the_family_excludes(live, tmp_path):
    _, result = live
    calib = tmp_path / "calib"
    shutil.copytree(result.out, calib)
    recipe = {"name": "w8_everything", "global": {"weight": {"dtype": "int8"}}, "exclude": ["*time_embedding*"], "exclude_mode": "replace"}
    unet = diffquant.quantize(changed_pipe().unet, calib, recipe, holdout=2)
    manifest = getattr(unet, MANIFEST_ATTRIBUTE)
    quantized = {layer["name"] for layer in manifest["layers"]}
    assert {"conv_in", "conv_out"} <= quantized
    assert {s["name"]: s["reason"] for s in manifest["skipped"]}["time_embedding.linear_1"] == "excluded by *time_embedding*"


def test_a_video_pipeline_calibrates_and_quantizes(tmp_path):
    """A text-to-video pipeline (a tiny UNet3DConditionModel on the sd15 twin's text encoder and VAE)."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    base = tiny_pipe("sd15")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet3DConditionModel(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    pipe = TextToVideoSDPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                 scheduler=DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    result = diffquant.calibrate(pipe, pipe.unet, PROMPTS[:2], tmp_path / "c", num_inference_steps=2, num_frames=3, **SMALL)
    assert result.manifest["num_samples"] == 4 and result.manifest["model"]["family"] == "custom"  # no preset: no excludes
    latents = all_samples(result.out)[0]["sample"]
    assert latents.shape == (2, 4, 3, 8, 8)  # CFG batch, latent channels, frames, 64 px / 8
    diffquant.quantize(pipe.unet, result, {"name": "w8", "global": {"weight": {"dtype": "int8"}}}, holdout=1)
    quantized = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLayer)]
    assert len(quantized) == len(getattr(pipe.unet, MANIFEST_ATTRIBUTE)["layers"]) > 0
    frames = pipe("a cat", num_inference_steps=2, num_frames=3, height=64, width=64, output_type="np").frames
    assert frames.shape == (1, 3, 64, 64, 3)
