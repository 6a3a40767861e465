"""What a new user tripped over (issue 15, item 5): generate --set / --compare, the artifact and
checkpoint printed last, inspect on checkpoints, family detection for plain directories, make
quantize CALIB=DIR, recipes that replace the excludes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from diffquant.cli import main
from diffquant.eval.metrics import psnr
from diffquant.models.presets import resolve_model
from diffquant.models.tiny import tiny_pipeline_dir
from diffquant.quant.quantizer import plan_layers
from diffquant.recipes import load_recipe
from diffquant.models.submodule import load_submodule

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(private_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    run = CliRunner().invoke(main, ["quantize", "--calib", str(private_calib("tiny-sdxl")), "--recipe", "int8_w8a8", "--holdout", "2", "--out", str(out)])
    assert run.exit_code == 0, run.output
    return out, run.output


def test_quantize_prints_checkpoint_and_artifact_on_the_last_line(checkpoint, private_calib):
    out, output = checkpoint
    assert output.strip().splitlines()[-1] == f"checkpoint: {out}  from calibration artifact {private_calib('tiny-sdxl')}"


def test_generate_set_compare_and_the_noise_note(checkpoint, tmp_path):
    out, _ = checkpoint
    reference = tmp_path / "reference.png"
    made = CliRunner().invoke(main, ["generate", "--model", "tiny-sdxl", "--prompt", "a cat", "--steps", "2", "--out", str(reference),
                                     "--set", "height=128", "--set", "width=128", "--set", "guidance_scale=5.0"])
    assert made.exit_code == 0, made.output
    assert Image.open(reference).size == (128, 128)
    assert made.output.strip().splitlines()[-1].endswith("the tiny model's weights are random, so expect a 64 px noise image)")
    image = tmp_path / "q.png"
    run = CliRunner().invoke(main, ["generate", "--checkpoint", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(image),
                                    "--set", "height=128", "--set", "width=128", "--set", "guidance_scale=5.0", "--compare", str(reference)])
    assert run.exit_code == 0, run.output
    expected = psnr(Image.open(image).convert("RGB"), Image.open(reference).convert("RGB"))
    assert f"PSNR against {reference}: {expected:.2f} dB" in run.output


@pytest.mark.parametrize(("option", "message"), [
    ("generator=3", "Error: --set generator is decided by diffquant itself"),
    ("guidance=3", "Error: StableDiffusionXLPipeline(...) takes no argument guidance — pass keywords of StableDiffusionXLPipeline.__call__ with --set"),
    ("height", "Error: --set 'height' is not KEY=VALUE"),
])
def test_generate_bad_set_is_one_line(option, message, tmp_path):
    run = CliRunner().invoke(main, ["generate", "--model", "tiny-sdxl", "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png"), "--set", option])
    assert run.exit_code == 2 and run.output.strip().startswith(message) and len(run.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_inspect_reads_a_checkpoint(checkpoint):
    out, _ = checkpoint
    run = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output)
    manifest = json.loads((out / "quant_manifest.json").read_text())
    assert summary["recipe"] == "int8_w8a8" and summary["quantized_layers"] == len(manifest["layers"]) == len(summary["layers"])
    assert summary["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert summary["output_sqnr_db"] == manifest["quality"]["output_sqnr_db"]
    table = CliRunner().invoke(main, ["inspect", str(out)])
    assert table.exit_code == 0 and manifest["layers"][0]["name"] in table.output


@pytest.mark.parametrize(("family", "target"), [("sdxl", "unet"), ("sd21", "unet"), ("sd15", "unet"), ("flux", "transformer"), ("sd3", "transformer"), ("pixart", "transformer")])
def test_a_plain_directory_gets_its_familys_settings(family, target, tmp_path):
    copy = tmp_path / "my-finetune"
    shutil.copytree(tiny_pipeline_dir(family), copy)
    preset, base = resolve_model(str(copy)), resolve_model(family)
    assert (preset.family, preset.target, preset.name, preset.source) == (family, target, "my-finetune", str(copy.resolve()))
    assert (preset.quant_exclude, preset.svd_exclude, preset.torch_dtype, preset.steps, preset.pipeline_kwargs) == (
        base.quant_exclude, base.svd_exclude, base.torch_dtype, base.steps, base.pipeline_kwargs)


def test_a_directory_of_an_unknown_model_keeps_the_plain_defaults(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    preset = resolve_model(str(tmp_path / "m"))
    assert (preset.family, preset.quant_exclude, preset.torch_dtype, preset.steps) == ("custom", (), "float32", 20)


def test_make_quantize_takes_calib(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "-W", "Makefile", "quantize", "CALIB=artifacts/calib/mine", "RECIPE=fp8", "VENV=/nonexistent"],
                         cwd=ROOT, capture_output=True, text=True)
    assert "diffquant quantize --calib artifacts/calib/mine --recipe fp8" in dry.stdout
    newest = subprocess.run(["make", "-n", "quantize", "MODEL=sdxl", "RECIPE=fp8", "VENV=/nonexistent"], cwd=ROOT, capture_output=True, text=True)
    assert "diffquant quantize --model sdxl --recipe fp8" in newest.stdout


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_exclude_mode_in_a_yaml_recipe(mode, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nglobal:\n  weight: {{dtype: int8}}\nexclude: ['*proj_out*']\nexclude_mode: {mode}\n")
    preset = resolve_model("tiny-sdxl")
    plans, skipped = plan_layers(load_submodule(preset), load_recipe(str(path)), preset.quant_exclude, preset.svd_exclude)
    reasons = {s.name: s.reason for s in skipped}
    planned = {p.name for p in plans}
    assert reasons["down_blocks.1.attentions.0.proj_out"] == "excluded by *proj_out*"
    if mode == "add":
        assert reasons["conv_in"] == "excluded by *conv_in*"
    else:
        assert "conv_in" in planned and not any("conv_in" in r for r in reasons.values())
