"""Flux.1-dev, SVDQuant w4a16: INT4 per-group-64 weights, 16-bit activations, smoothing and a rank-32 branch.

Runs against diffquant's tiny random-weight Flux twin, so the image is 64 px noise; for the real
model load `black-forest-labs/FLUX.1-dev` with torch_dtype=torch.bfloat16, device_map="balanced",
and pass height=1024, width=1024, max_sequence_length=512.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

import diffquant
from diffquant.models.tiny import tiny_pipeline_dir

pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir("flux"), torch_dtype=torch.bfloat16)  # real: "black-forest-labs/FLUX.1-dev"
pipe.to("cuda" if torch.cuda.is_available() else "cpu")
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=3.0)
with torch.no_grad():
    pipe.transformer.transformer_blocks[0].ff.net[2].weight.mul_(1.1)  # a fine-tune or fused LoRA: the live weights count

prompts = [
    "A serene lake reflecting mountains at sunset",
    "A futuristic city with flying cars at night",
    "A close-up portrait with dramatic lighting",
    "A golden retriever playing in autumn leaves",
    "An astronaut floating above Earth",
]
flux = {"height": 64, "width": 64, "guidance_scale": 3.5, "max_sequence_length": 32}  # real: 1024, 1024, 3.5, 512
artifact = diffquant.calibrate(pipe, pipe.transformer, prompts, "artifacts/examples/flux-calib", num_inference_steps=20, **flux)
pipe.transformer = diffquant.quantize(pipe.transformer, artifact, "svdquant_w4a16")  # Flux's excludes come with the family

image = pipe("A cat on a windowsill", num_inference_steps=50, **flux).images[0]
image.save("flux_svdquant_w4a16.png")
print("wrote flux_svdquant_w4a16.png: 64 px noise from the tiny twin's random weights; a real model gives a real image")
