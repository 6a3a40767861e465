"""SDXL, INT8 weights and activations (w8a8: static per-tensor scales, min_max observer): calibrate and quantize the pipe you hold.

Runs against diffquant's tiny random-weight SDXL twin, so the image is 64 px noise; for the real
model load `stabilityai/stable-diffusion-xl-base-1.0` with torch_dtype=torch.float16, variant="fp16".
"""

import torch
from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

import diffquant
from diffquant.models.tiny import tiny_pipeline_dir

pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))  # real: "stabilityai/stable-diffusion-xl-base-1.0"
pipe.to("cuda" if torch.cuda.is_available() else "cpu")
pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)  # your own scheduler
with torch.no_grad():
    pipe.unet.conv_out.weight.mul_(1.1)  # stands for a fine-tune or a fused LoRA: the live weights are calibrated

prompts = [
    "A serene lake reflecting mountains at sunset",
    "A futuristic city with flying cars at night",
    "A close-up portrait with dramatic lighting",
    "A golden retriever playing in autumn leaves",
    "An astronaut floating above Earth",
]
artifact = diffquant.calibrate(pipe, pipe.unet, prompts, "artifacts/examples/sdxl-calib-5", num_inference_steps=20, guidance_scale=8.0, height=64, width=64)
pipe.unet = diffquant.quantize(pipe.unet, artifact, "int8_w8a8")

image = pipe("A cat on a windowsill", num_inference_steps=30, guidance_scale=8.0, height=64, width=64).images[0]
image.save("sdxl_int8_w8a8.png")
print("wrote sdxl_int8_w8a8.png: 64 px noise from the tiny twin's random weights; a real model gives a real image")
