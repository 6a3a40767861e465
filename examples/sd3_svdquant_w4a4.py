"""SD3, SVDQuant w4a4: INT4 weights and dynamic INT4 activations, smoothing and a rank-32 16-bit branch.

Runs against diffquant's tiny random-weight SD3 twin, so the image is 64 px noise; for the real
model load `stabilityai/stable-diffusion-3-medium-diffusers` with torch_dtype=torch.float16 and
drop height, width and max_sequence_length (the tiny T5 is short).
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

import diffquant
from diffquant.models.tiny import tiny_pipeline_dir

pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir("sd3"))  # real: "stabilityai/stable-diffusion-3-medium-diffusers"
pipe.to("cuda" if torch.cuda.is_available() else "cpu")
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=2.0)  # your own scheduler settings
with torch.no_grad():
    pipe.transformer.transformer_blocks[0].attn.to_q.weight.mul_(1.1)  # a fine-tune or fused LoRA: the live weights count

prompts = [
    "A serene lake reflecting mountains at sunset",
    "A futuristic city with flying cars at night",
    "A close-up portrait with dramatic lighting",
    "A golden retriever playing in autumn leaves",
    "An astronaut floating above Earth",
]
small = {"height": 64, "width": 64, "max_sequence_length": 32}  # the tiny twin's size
artifact = diffquant.calibrate(pipe, pipe.transformer, prompts, "artifacts/examples/sd3-calib", num_inference_steps=20, **small)
pipe.transformer = diffquant.quantize(pipe.transformer, artifact, "svdquant_w4a4")  # SD3's excludes come with the family

image = pipe("A cat on a windowsill", num_inference_steps=30, **small).images[0]
image.save("sd3_svdquant_w4a4.png")
print("wrote sd3_svdquant_w4a4.png: 64 px noise from the tiny twin's random weights; a real model gives a real image")
