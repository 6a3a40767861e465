"""Calibrate with COCO2014 captions (the MLCommons text-to-image calibration set) instead of hand-written prompts.

Get the captions with MLCommons' tools (github.com/mlcommons/inference, text_to_image/tools/
download-coco-2014.sh); pass the path of `captions_source.tsv` (or the calibration `captions.tsv`)
as the first argument. diffquant reads the TSV's `caption` column itself. Runs against the tiny
random-weight SDXL twin (real: `stabilityai/stable-diffusion-xl-base-1.0`).
"""

import sys

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

import diffquant
from diffquant.models.tiny import tiny_pipeline_dir
from diffquant.prompts import load_prompts

pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))  # real: "stabilityai/stable-diffusion-xl-base-1.0"
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
with torch.no_grad():
    pipe.unet.conv_in.weight.mul_(1.1)

prompts = load_prompts(sys.argv[1] if len(sys.argv) > 1 else "inference/text_to_image/coco2014/captions/captions_source.tsv").prompts[:50]
artifact = diffquant.calibrate(pipe, pipe.unet, prompts, "artifacts/examples/sdxl-coco", num_inference_steps=20, guidance_scale=8.0, height=64, width=64)
pipe.unet = diffquant.quantize(pipe.unet, artifact, "int8_w8a8")
pipe("A cat on a windowsill", num_inference_steps=30, guidance_scale=8.0, height=64, width=64).images[0].save("sdxl_coco_w8a8.png")
print(f"calibrated on {len(prompts)} COCO captions into {artifact.out}; wrote sdxl_coco_w8a8.png (64 px noise: random tiny weights)")
