"""Stage two at real model size: peak memory / model bytes and the time of each phase, per recipe.

A denoiser with a real configuration gets random weights and is saved into a copy of the tiny
pipeline directory of its family, so stage two loads it through `from_pretrained` as it would a
hub model (`--family`):

- `sd15` (default): a UNet with the real Stable Diffusion 1.5 configuration
  (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json: the UNet2DConditionModel
  defaults with cross_attention_dim 768; 860 M parameters, 3.4 GB in float32);
- `sdxl`: the SDXL base 1.0 UNet (`SDXL_UNET_CONFIG`; 2.6 B parameters, 5.1 GB in 16 bits);
- `flux`: the FLUX.1-dev transformer (`FLUX_TRANSFORMER_CONFIG`; 11.9 B parameters, 23.8 GB in
  bfloat16). `--layers N` keeps N of its 19 double-stream and 2N of its 38 single-stream blocks
  (the real ratio) at the real width, and the table heading says so.

`--dtype` is the submodule's dtype (default: float32 for sd15, as before; float16 for sdxl and
bfloat16 for flux, their presets'). The SD 1.5 UNet is constructed whole, as before. SDXL and Flux
are built on the meta device (accelerate's `init_empty_weights`) and written module by module into
safetensors shards of 2 GiB with a diffusers index, each module initialised by its own
`reset_parameters` (PyTorch's default layer init, what the constructor draws; norms without one
get weight 1, bias 0): building needs about one shard of memory, never the model twice. The build's
peak RSS rise over the model bytes is printed.

Stage one runs in this process through a stand-in pipeline that calls the denoiser as the family's
diffusers pipeline's denoising loop does, with random latents and text embeddings, `--prompts` x
`--steps` times, on `--device`:

- sd15: latents [2, 4, px/8, px/8], 77 text tokens of 768 (classifier-free guidance batch of 2);
- sdxl (StableDiffusionXLPipeline): the latents twice (CFG), encoder_hidden_states [2, 77, 2048],
  added_cond_kwargs text_embeds [2, 1280] and time_ids [2, 6] = (h, w, 0, 0, h, w);
- flux (FluxPipeline): packed latents [1, (px/16)^2, 64], encoder_hidden_states [1, T, 4096] with
  T = `--text-tokens` (512, the pipeline's max_sequence_length; fewer for speed),
  pooled_projections [1, 768], timestep = sigma (the pipeline's t / 1000), img_ids / txt_ids as the
  pipeline lays them out, guidance [1] = 3.5; a flow-matching Euler step between calls.

Each recipe is then quantized in a fresh process (`python -m diffquant quantize --device D
[--blockwise | --device-map M]`: whole, block by block, or placed by accelerate), whose peak RSS (VmHWM) is read at exit: "peak / model" is that peak over the
submodule's bytes, and "peak - base / model" subtracts the RSS of a process that imported the same
libraries (and, on CUDA, started the CUDA context) and did nothing. On CUDA the table adds the
manifest's `placement.cuda_max_memory_allocated_bytes` over the model bytes; block by block, also
the largest block's bytes over the model's. Phase times come from the checkpoint manifest
(`timing.phases_seconds`).

`--quick` is a smoke run of each family: sd15 a UNet 1/10 the width (as before); sdxl widths
(32, 64, 128) with one transformer layer per level and 64-wide text; flux 2 heads of 64 (width 128),
128-wide text, 2 + 4 blocks unless `--layers`; sdxl and flux at 128 px, flux with 64 text tokens,
and 4 MiB shards so that the sharded loading path runs as at real size.

`--quark` (issues 16 / 17) sets diffquant beside AMD Quark 0.13 at real size, for the INT8
per-tensor recipes (int8_weight_only, int8_w8a8; other recipes get no Quark row): after the
shipped recipe, diffquant runs again at Quark's scale rule (`scale_rule: half_span` on the weight,
and on the inputs of int8_w8a8: `harness.quark_equal_variant`), then `quark_stage_two.py` runs
`ModelQuantizer.quantize_model` in a fresh process of its own (its VmHWM is Quark's alone) on the
same calibration samples (stage two's split for `--holdout`, checked against the checkpoint's
held-out ids), with every layer diffquant did not quantize excluded (Conv2d and Linear alike; the
two sets are checked equal), and scores it with stage two's own `measure_output` over the same
held-out samples. A second table gives both tools side by side: quantize seconds (Quark: the
`quantize_model` call; diffquant: its statistics + weights phases), the whole process's seconds
(diffquant: the `diffquant quantize` process; Quark: from its start to the output SQNR), peak RSS
/ model, output SQNR and median layer SQNR; a third compares Quark's fake-quantized weights with
each diffquant checkpoint's codes and scales layer by layer (`harness.compare_int_weights`; the
records per layer go to `quark-<recipe>-layers.json` in the workdir, the run's figures to
`quark-<recipe>.json`). Without `import quark` the Quark rows are skipped with a message.

Not part of `make bench` (about 15 minutes on 2 cores for sd15): `make bench-scale`, or
`python benchmarks/bench_scale.py [--quick] [--family F] [--device D] [--blockwise | --device-map auto] [--dtype T]
[--layers N] [--recipes a,b] [--workdir DIR] [--table FILE] [--drop-checkpoints] [--quark]`
(`make bench-scale ARGS='--quark --recipes int8_weight_only,int8_w8a8 --workdir DIR'`). `--workdir` keeps
the built model and its calibration in DIR and reuses them on the next run with the same settings
(otherwise a temporary directory is removed at the end); `--table` rewrites FILE with the section
so far after every recipe (so a run cut short by a time limit keeps its finished rows);
`--drop-checkpoints` deletes each quantized checkpoint once its figures are read (disk space).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (diffquant_recipe, markdown_table, parse_args, preloaded_pipeline, progress, quark_equal_variant,  # noqa: E402
                     reset_rss_peak, rss_now_mb, rss_peak_mb)

from diffquant.models.tiny import tiny_pipeline_dir  # noqa: E402
from diffquant.stages.calibrate import CalibrationSettings, calibrate  # noqa: E402

RECIPES = ("int8_weight_only", "int8_w8a8", "int8_w8a8_mse", "svdquant_w4a4", "nvfp4")
LATENT = (4, 32, 32)  # 256 px
TEXT = (77, 768)
SHARD_BYTES = 2 << 30
QUICK_SHARD_BYTES = 4 << 20
HOLDOUT = 2
QUARK_SCALE_RECIPES = ("int8_weight_only", "int8_w8a8")  # the INT8 per-tensor recipes `--quark` compares
QUARK_RUN = Path(__file__).resolve().parent / "quark_stage_two.py"

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from the
# UNet2DConditionModel defaults; the rest of that file restates the defaults).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name; it is the head count (64-wide heads)
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled text
}
# black-forest-labs/FLUX.1-dev, transformer/config.json.
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


@dataclass(frozen=True)
class Family:
    """One denoiser of the benchmark: its real config, what `--quick` changes, its defaults."""

    name: str
    target: str
    model_class: str
    label: str
    config: dict[str, Any]
    quick: dict[str, Any]
    dtype: str
    size: int
    quick_size: int
    text_tokens: int | None = None
    quick_text_tokens: int | None = None
    streamed: bool = True  # built on the meta device and written module by module
    quick_layers: int | None = None
    pipeline_kwargs: tuple[str, ...] = field(default=("height", "width"))


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "unet", "UNet2DConditionModel", "SD 1.5-size UNet", {"cross_attention_dim": 768, "sample_size": 64},
                   {"block_out_channels": (32, 64, 128, 128), "attention_head_dim": 4}, "float32", 256, 256, streamed=False,
                   pipeline_kwargs=()),
    "sdxl": Family("sdxl", "unet", "UNet2DConditionModel", "SDXL base UNet", SDXL_UNET_CONFIG,
                   {"block_out_channels": (32, 64, 128), "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (1, 2, 4),
                    "cross_attention_dim": 64, "addition_time_embed_dim": 16,
                    "projection_class_embeddings_input_dim": 6 * 16 + 32, "sample_size": 32},
                   "float16", 1024, 128),
    "flux": Family("flux", "transformer", "FluxTransformer2DModel", "FLUX.1-dev transformer", FLUX_TRANSFORMER_CONFIG,
                   {"attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 128, "pooled_projection_dim": 64,
                    "axes_dims_rope": (16, 24, 24)},
                   "bfloat16", 1024, 128, text_tokens=512, quick_text_tokens=64, quick_layers=2,
                   pipeline_kwargs=("height", "width", "max_sequence_length")),
}


# Stand-in pipelines -----------------------------------------------------------------------------


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.nn.Module) -> torch.Tensor:
    """Standard normal values drawn on the generator's device, in the module's dtype and device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(device=like.device, dtype=like.dtype)


class StandInPipeline:
    """Calls its UNet as StableDiffusionPipeline's denoising loop does, with random inputs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    def __call__(self, prompt: str, num_inference_steps: int = 4, generator: torch.Generator | None = None,
                 output_type: str = "latent", **kwargs: object) -> object:
        text = _randn((2, *TEXT), generator, self.unet)
        latents = _randn((2, *LATENT), generator, self.unet)
        for step in range(num_inference_steps):
            timestep = torch.tensor(999 - step * (1000 // num_inference_steps), device=self.unet.device)
            latents = latents - 0.1 * self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
        return latents


class StandInSDXLPipeline:
    """Calls its UNet as StableDiffusionXLPipeline's denoising loop does (classifier-free guidance:
    the latents twice, negative and positive text), with random latents and text embeddings."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    def __call__(self, prompt: str, num_inference_steps: int = 4, generator: torch.Generator | None = None,
                 output_type: str = "latent", height: int = 1024, width: int = 1024, guidance_scale: float = 5.0,
                 **kwargs: object) -> object:
        config, unet = self.unet.config, self.unet
        pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        text = _randn((2, 77, config.cross_attention_dim), generator, unet)
        added = {"text_embeds": _randn((2, pooled_width), generator, unet),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, device=unet.device, dtype=unet.dtype)}
        latents = _randn((1, config.in_channels, height // 8, width // 8), generator, unet)
        for step in range(num_inference_steps):
            timestep = torch.tensor(999.0 - step * (1000 // num_inference_steps), device=unet.device)
            noise = unet(torch.cat([latents] * 2), timestep, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]
            uncond, cond = noise.chunk(2)
            latents = latents - 0.1 * (uncond + guidance_scale * (cond - uncond))
        return latents


class StandInFluxPipeline:
    """Calls its transformer as FluxPipeline's denoising loop does (guidance-distilled, batch 1):
    packed latents, `max_sequence_length` text tokens, timestep = sigma = t / 1000, img_ids and
    txt_ids laid out as the pipeline does, a flow-matching Euler step between calls."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __call__(self, prompt: str, num_inference_steps: int = 4, generator: torch.Generator | None = None,
                 output_type: str = "latent", height: int = 1024, width: int = 1024, guidance_scale: float = 3.5,
                 max_sequence_length: int = 512, **kwargs: object) -> object:
        model = self.transformer
        config, device, dtype = model.config, model.device, model.dtype
        rows, cols = height // 16, width // 16  # 8x VAE, then 2x2 patches packed into the channels
        latents = _randn((1, rows * cols, config.in_channels), generator, model)
        text = _randn((1, max_sequence_length, config.joint_attention_dim), generator, model)
        pooled = _randn((1, config.pooled_projection_dim), generator, model)
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] += torch.arange(rows)[:, None]
        img_ids[..., 2] += torch.arange(cols)[None, :]
        img_ids = img_ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)
        txt_ids = torch.zeros(max_sequence_length, 3, device=device, dtype=dtype)
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(1)
        sigmas = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist() + [0.0]
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            timestep = torch.tensor([sigma * 1000.0], device=device).to(dtype)
            velocity = model(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                             encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            latents = latents + (next_sigma - sigma) * velocity
        return latents


STAND_INS = {"sd15": StandInPipeline, "sdxl": StandInSDXLPipeline, "flux": StandInFluxPipeline}


# Settings and where things go ------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What one run builds and calibrates, from the arguments."""

    family: Family
    quick: bool
    dtype: str
    layers: int | None
    size: int
    text_tokens: int | None
    prompts: int
    steps: int
    device: str
    blockwise: bool
    device_map: str | None = None

    @property
    def placement_args(self) -> list[str]:
        """The placement options of each `diffquant quantize` run."""
        if self.blockwise:
            return ["--blockwise"]
        return ["--device-map", self.device_map] if self.device_map else []

    @property
    def config(self) -> dict[str, Any]:
        config = {**self.family.config, **(self.family.quick if self.quick else {})}
        if self.layers is not None:
            config.update(num_layers=self.layers, num_single_layers=2 * self.layers)
        return config

    @property
    def legacy(self) -> bool:
        """The settings of the original SD 1.5 benchmark, whose workdir names are kept."""
        return self.family.name == "sd15" and not self.quick and self.dtype == "float32" and self.size == 256 and self.device == "cpu"

    @property
    def model_name(self) -> str:
        if self.legacy:
            return "sd15-size"
        layers = f"-{self.layers}layers" if self.layers is not None else ""
        return f"{self.family.name}-{'quick' if self.quick else 'size'}-{self.dtype}{layers}"

    @property
    def calib_name(self) -> str:
        if self.legacy:
            return "calib"
        tokens = f"-{self.text_tokens}tok" if self.text_tokens is not None else ""
        return f"{self.model_name}-calib-{self.prompts}x{self.steps}-{self.size}px{tokens}-{self.device}"

    @property
    def pipeline_kwargs(self) -> dict[str, int]:
        values = {"height": self.size, "width": self.size, "max_sequence_length": self.text_tokens}
        return {key: values[key] for key in self.family.pipeline_kwargs}

    def heading(self) -> str:
        if self.family.name == "sd15" and self.quick:
            what = "quick: a 1/10-width UNet"
        elif self.quick:
            what = f"quick: a small-width {self.family.label}"
        else:
            what = self.family.label
        config = self.config
        if self.family.name == "flux" and (config["num_layers"], config["num_single_layers"]) != (19, 38):
            what += (f"{'' if self.quick else ' at the real width'} with {config['num_layers']} of 19 double-stream and "
                     f"{config['num_single_layers']} of 38 single-stream blocks")
        place = (f"block by block on {self.device}" if self.blockwise else
                 f"placed by accelerate (device_map {self.device_map}) on {self.device}" if self.device_map else f"whole, on {self.device}")
        return f"{what}, {self.dtype}" if self.legacy and not self.device_map else f"{what}, {self.dtype}, {place}"


def parse() -> tuple[argparse.Namespace, Setup]:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--recipes", default=",".join(RECIPES))
        parser.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where stage one and stage two run")
        parser.add_argument("--blockwise", action="store_true", help="quantize block by block (`diffquant quantize --blockwise`)")
        parser.add_argument("--device-map", default=None, help="quantize placed by accelerate (`diffquant quantize --device-map auto`)")
        parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="the submodule's dtype")
        parser.add_argument("--layers", type=int, default=None, help="flux: N double-stream and 2N single-stream blocks")
        parser.add_argument("--size", type=int, default=None, help="image size in px for the calibration samples")
        parser.add_argument("--text-tokens", type=int, default=None, help="flux: text tokens per sample (512 as the pipeline)")
        parser.add_argument("--prompts", type=int, default=3)
        parser.add_argument("--steps", type=int, default=4)
        parser.add_argument("--workdir", type=Path, default=None)
        parser.add_argument("--table", type=Path, default=None, help="rewrite this file with the section after every recipe")
        parser.add_argument("--drop-checkpoints", action="store_true", help="delete each quantized checkpoint once read")
        parser.add_argument("--quark", action="store_true", help="also AMD Quark's quantize_model, in its own process (INT8 recipes)")

    args = parse_args(__doc__, extra)
    family = FAMILIES[args.family]
    if args.layers is not None and family.name != "flux":
        sys.exit("bench_scale: --layers applies to --family flux only")
    if args.layers is not None and not 1 <= args.layers <= 19:
        sys.exit("bench_scale: --layers must be 1..19 (FLUX.1-dev has 19 double-stream blocks)")
    if args.text_tokens is not None and family.name != "flux":
        sys.exit("bench_scale: --text-tokens applies to --family flux only (CLIP text is 77 tokens)")
    if args.blockwise and args.device_map:
        sys.exit("bench_scale: --blockwise and --device-map are two placements; give one")
    if args.quark and args.blockwise:
        sys.exit("bench_scale: --quark loads the submodule whole (Quark's quantize_model); drop --blockwise")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scale: --device cuda, but torch sees no CUDA device")
    size = args.size or (family.quick_size if args.quick else family.size)
    if size <= 0 or size % (16 if family.name == "flux" else 8):
        sys.exit(f"bench_scale: --size {size} is not a positive multiple of {16 if family.name == 'flux' else 8}")
    tokens = args.text_tokens or (family.quick_text_tokens if args.quick else family.text_tokens)
    layers = args.layers if args.layers is not None else (family.quick_layers if args.quick else None)
    setup = Setup(family, args.quick, args.dtype or family.dtype, layers, size, tokens, args.prompts, args.steps, args.device,
                  args.blockwise, args.device_map)
    return args, setup


# Building the model ----------------------------------------------------------------------------


def build_model_dir(root: Path, setup: Setup) -> tuple[Path, float | None]:
    """A copy of the family's tiny pipeline whose target submodule is the real-config one with
    random weights, written into `root / setup.model_name` (built beside it, then renamed);
    returns (dir, the build's peak RSS rise in bytes, None where the peak cannot be reset)."""
    import diffusers

    family = setup.family
    final = root / setup.model_name
    tmp = root / f".{setup.model_name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_pipeline_dir(family.name), tmp)
    shutil.rmtree(tmp / family.target)
    cls = getattr(diffusers, family.model_class)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # filling random weights is not a measured figure
    before = rss_now_mb()
    can_reset = reset_rss_peak()
    try:
        torch.manual_seed(0)
        if family.streamed:
            write_random_model(cls, setup.config, tmp / family.target, getattr(torch, setup.dtype),
                               QUICK_SHARD_BYTES if setup.quick else SHARD_BYTES)
        else:
            model = cls(**setup.config)
            if setup.dtype != "float32":  # nn.Module.to: ModelMixin.to warns about fp32-pinned modules the UNet has none of
                model = torch.nn.Module.to(model, getattr(torch, setup.dtype))
            model.save_pretrained(tmp / family.target)
            del model
    finally:
        torch.set_num_threads(threads)
    rise = (rss_peak_mb() - before) * 2**20 if can_reset else None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final, rise


def write_random_model(cls: type, config: dict[str, Any], folder: Path, dtype: torch.dtype, shard_bytes: int) -> int:
    """Save `cls(**config)` with random weights into `folder` as diffusers' sharded safetensors
    layout (one file when it fits one shard), never holding more than one shard; returns bytes."""
    from accelerate import init_empty_weights
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    with init_empty_weights():
        model = cls(**config)
    folder.mkdir(parents=True)
    model.save_config(folder)
    owners = [(prefix, module) for prefix, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    for prefix, module in model.named_modules():
        persistent = [name for name in module._buffers if name not in module._non_persistent_buffers_set]
        if persistent:
            raise RuntimeError(f"{prefix or type(model).__name__} has persistent buffers {persistent}: random values would be wrong")
    shards: list[list[tuple[str, torch.nn.Module]]] = [[]]
    filled = 0
    for prefix, module in owners:
        nbytes = sum(p.numel() for p in module.parameters(recurse=False)) * dtype.itemsize
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((prefix, module))
        filled += nbytes
    names = [SAFETENSORS_WEIGHTS_NAME] if len(shards) == 1 else [
        SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", f"-{i + 1:05d}-of-{len(shards):05d}.safetensors") for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in shard:
            module.to_empty(device="cpu", recurse=False)
            _initialise(module)
            for key, param in module.named_parameters(recurse=False):
                tensors[f"{prefix}.{key}" if prefix else key] = param.detach().to(dtype).contiguous()
            module.to_empty(device="meta", recurse=False)
        save_file(tensors, str(folder / f".{name}.tmp"), metadata={"format": "pt"})
        (folder / f".{name}.tmp").rename(folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _initialise(module: torch.nn.Module) -> None:
    """Draw `module`'s own parameters as its constructor would: `reset_parameters` (Linear, Conv,
    norms, Embedding); a norm without one (diffusers' RMSNorm) gets weight 1 and bias 0."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for name, param in module.named_parameters(recurse=False):
        if "norm" not in type(module).__name__.lower() or name not in ("weight", "bias"):
            raise RuntimeError(f"no initialiser for {type(module).__name__}.{name}")
        with torch.no_grad():
            param.fill_(1.0 if name == "weight" else 0.0)


def weight_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, element count) of every tensor in the safetensors files of `folder`, from their headers."""
    nbytes = count = 0
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key != "__metadata__":
                begin, end = entry["data_offsets"]
                nbytes += end - begin
                count += (end - begin) // itemsize[entry["dtype"]]
    return nbytes, count


# Stage one and stage two ------------------------------------------------------------------------


def prepare(root: Path, setup: Setup) -> tuple[Path, int, int, float, float | None]:
    """The pipeline and its calibration under `root`, built unless already there (a finished
    calibration has its manifest and its seconds file); (model dir, submodule bytes, parameters,
    calibration seconds, build peak RSS rise or None when not built now)."""
    import diffusers

    family = setup.family
    model_dir = root / setup.model_name
    build_rise = None
    if not (model_dir / family.target / "config.json").is_file():
        progress(f"building the {family.label} ({setup.model_name})")
        model_dir, build_rise = build_model_dir(root, setup)
    model_bytes, parameters = weight_bytes(model_dir / family.target)
    calib = root / setup.calib_name
    seconds_file = root / ("calibration_seconds.txt" if setup.legacy else f"{setup.calib_name}.seconds")
    if not (calib / "manifest.json").is_file() or not seconds_file.is_file():
        progress(f"calibrating on {setup.device}")
        cls = getattr(diffusers, family.model_class)
        model = cls.from_pretrained(model_dir / family.target, torch_dtype=getattr(torch, setup.dtype)).to(setup.device).eval()
        start = time.perf_counter()
        with preloaded_pipeline(STAND_INS[family.name](model)):
            calibrate(CalibrationSettings(model=str(model_dir), out=calib, num_prompts=setup.prompts, steps=setup.steps,
                                          dtype=setup.dtype, device=setup.device, pipeline_kwargs=setup.pipeline_kwargs,
                                          overwrite=True), show_progress=False)
        seconds_file.write_text(f"{time.perf_counter() - start:.1f}")
        del model
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    return model_dir, model_bytes, parameters, float(seconds_file.read_text()), build_rise


def quantize_peak(calib: Path, recipe: str, out: Path, device: str = "cpu", placement: tuple[str, ...] = ()) -> tuple[float, dict, float]:
    """(peak RSS in bytes of a `diffquant quantize` process, its checkpoint manifest, the process's wall seconds)."""
    script = (
        "import sys, runpy\n"
        "sys.argv = ['diffquant', 'quantize', '--calib', sys.argv[1], '--recipe', sys.argv[2], '--out', sys.argv[3], '--device', sys.argv[4],"
        f" '--holdout', '{HOLDOUT}', '--json'] + sys.argv[5:]\n"
        "try:\n    runpy.run_module('diffquant', run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\nelse:\n    code = 0\n"
        "print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    command = [sys.executable, "-c", script, str(calib), recipe, str(out), device, *placement]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"quantize {recipe} failed: {done.stderr[-2000:]}")
    peak_kb = float(next(line for line in done.stderr.splitlines() if line.startswith("VmHWM")).split()[1])
    return peak_kb * 1024, json.loads((out / "quant_manifest.json").read_text()), seconds


def quark_run(calib: Path, recipe: str, checkpoints: list[Path], layers_out: Path, device: str = "cpu") -> dict[str, Any]:
    """`quark_stage_two.py` in a fresh process against diffquant's `checkpoints`: its RESULT record."""
    command = [sys.executable, str(QUARK_RUN), "--calib", str(calib), "--recipe", recipe, "--holdout", str(HOLDOUT), "--device", device,
               "--layers-out", str(layers_out), "--started", repr(time.time())]
    for checkpoint in checkpoints:
        command += ["--against", str(checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"Quark {recipe} failed: {done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"Quark {recipe} printed no RESULT line: {done.stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def quark_available() -> str | None:
    """None when `import quark` works, else why not (one line)."""
    try:
        import quark  # noqa: F401
    except Exception as error:  # any failure of the import means no Quark rows, said in one line
        return f"{type(error).__name__}: {error}"
    return None


def baseline_rss(device: str = "cpu") -> float:
    """Peak RSS of a process that imports what `diffquant quantize` imports (and on CUDA starts the
    CUDA context) and quantizes nothing."""
    script = ("import sys, torch, diffquant.cli, diffquant.stages.quantize, diffusers\n"
              "if sys.argv[1] == 'cuda':\n    torch.zeros(1, device='cuda')\n"
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    done = subprocess.run([sys.executable, "-c", script, device], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1]) * 1024


PHASES = ("load", "statistics", "weights", "quality_report", "write")


def table_row(recipe: str, peak: float, base: float, model_bytes: int, manifest: dict[str, Any], setup: Setup) -> list[str]:
    phases = manifest["timing"]["phases_seconds"]
    placement = manifest.get("placement", {})
    work = manifest["timing"]["quantize_seconds"] - phases.get("quality_report", 0.0)
    row = [recipe, f"{peak / model_bytes:.2f}", f"{(peak - base) / model_bytes:.2f}"]
    if setup.device == "cuda":
        row.append(f"{placement['cuda_max_memory_allocated_bytes'] / model_bytes:.2f}")
    if setup.blockwise:
        row.append(f"{placement['largest_unit_bytes'] / model_bytes:.3f}")
    row += [f"{phases.get(name, 0.0):.1f}" for name in PHASES]
    row += [f"{work / (phases.get('load', 0.0) + phases.get('write', 0.0)):.2f}", f"{manifest['quality']['output_sqnr_db']:.2f}"]
    return row


def table_headers(setup: Setup) -> list[str]:
    headers = ["recipe", "peak / model", "peak - base / model"]
    if setup.device == "cuda":
        headers.append("cuda max allocated / model")
    if setup.blockwise:
        headers.append("largest block / model")
    return headers + ["load s", "statistics s", "weights s", "quality report s", "write s", "wall without quality report / (load + write)",
                      "output SQNR dB"]


def section(setup: Setup, model_bytes: int, parameters: int, calib_seconds: float, build_rise: float | None, base: float,
            rows: list[list[str]], planned: int) -> str:
    tokens = f", {setup.text_tokens} text tokens" if setup.text_tokens is not None else ""
    build = f"; building it raised peak RSS by {build_rise / model_bytes:.2f} x its bytes" if build_rise is not None else ""
    how = f"`diffquant quantize --device {setup.device}{''.join(' ' + arg for arg in setup.placement_args)} --holdout {HOLDOUT}`"
    lines = [
        f"## Stage two at real size ({setup.heading()})\n",
        f"command: `python benchmarks/bench_scale.py{''.join(' ' + arg for arg in sys.argv[1:])}`",
        "",
        f"{setup.family.target}: {parameters / 1e6:.0f} M parameters, {model_bytes / 2**30:.2f} GiB of {setup.dtype} weights, random{build}; "
        f"calibration: {setup.prompts} prompts x {setup.steps} steps at {setup.size} px{tokens} on {setup.device} ({calib_seconds:.0f} s); "
        f"each recipe: {how} in a fresh process; base RSS of the libraries alone {base / 2**30:.2f} GiB.\n",
        markdown_table(table_headers(setup), rows),
    ]
    if len(rows) < planned:
        lines.append(f"\n({len(rows)} of {planned} recipes done so far.)")
    return "\n".join(lines) + "\n"


QUARK_HEADERS = ["recipe", "tool", "quantize s", "process s", "peak / model", "output SQNR dB", "median layer dB"]
WEIGHT_HEADERS = ["recipe", "diffquant checkpoint", "layers", "same scale (layers)", "scale diffquant / Quark", "differing codes / elements",
                  "largest code difference", "largest distance from a tie", "differing values", "median layer dB diffquant / Quark",
                  "layer dB recomputed - manifest (max)"]


def diffquant_quark_row(recipe: str, tool: str, peak: float, seconds: float, model_bytes: int, manifest: dict[str, Any]) -> list[str]:
    phases, quality = manifest["timing"]["phases_seconds"], manifest["quality"]
    work = phases.get("statistics", 0.0) + phases.get("weights", 0.0)
    return [recipe, tool, f"{work:.1f}", f"{seconds:.1f}", f"{peak / model_bytes:.2f}", f"{quality['output_sqnr_db']:.3f}",
            f"{quality['median_layer_output_sqnr_db']:.3f}"]


def quark_row(recipe: str, result: dict[str, Any], model_bytes: int) -> list[str]:
    median = result["summary"][0]["median_layer_quark_db"]
    return [recipe, "quark", f"{result['quantize_s']:.1f}", f"{result['process_s']:.1f}", f"{result['peak_bytes'] / model_bytes:.2f}",
            f"{result['output_sqnr_db']:.3f}", f"{median:.3f}"]


def weight_rows(recipe: str, result: dict[str, Any], labels: list[str]) -> list[list[str]]:
    rows = []
    for label, entry in zip(labels, result["summary"]):
        low, high = f"{entry['scale_ratio_min']:.6f}", f"{entry['scale_ratio_max']:.6f}"
        ratio = low if low == high else f"{low}-{high}"
        ties = "–" if entry["tie_distance_max"] is None else f"{entry['tie_distance_max']:.2e}"
        gap = "–" if entry["max_recomputed_vs_manifest_db"] is None else f"{entry['max_recomputed_vs_manifest_db']:.4f}"
        rows.append([recipe, label, str(result["layers"]), str(entry["layers_same_scale"]), ratio,
                     f"{entry['differing_codes']} / {entry['elements']}", str(entry["max_code_difference"]), ties,
                     str(entry["differing_values"]), f"{entry['median_layer_manifest_db']:.3f} / {entry['median_layer_quark_db']:.3f}", gap])
    return rows


def quark_section(quark_rows: list[list[str]], weight_table: list[list[str]], notes: list[str]) -> str:
    lines = ["\n### diffquant beside AMD Quark 0.13 (`--quark`)\n", markdown_table(QUARK_HEADERS, quark_rows)]
    if weight_table:
        lines += ["", "Quark's fake-quantized weights against each diffquant checkpoint, over every quantized layer:", "",
                  markdown_table(WEIGHT_HEADERS, weight_table)]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_table(path: Path, text: str) -> None:
    """Replace `path` with `text` whole (written beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    args, setup = parse()
    # A time limit's SIGTERM (`timeout`) unwinds like an error, so the temporary models are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    recipes = [r for r in args.recipes.split(",") if r]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        model_dir, model_bytes, parameters, calib_seconds, build_rise = prepare(root, setup)
        if build_rise is not None:
            progress(f"build peak RSS rise / model: {build_rise / model_bytes:.2f}")
        base = baseline_rss(setup.device)
        rows: list[list[str]] = []
        quark_rows: list[list[str]] = []
        weight_table: list[list[str]] = []
        notes: list[str] = []
        missing = quark_available() if args.quark else None
        if missing is not None:
            notes.append(f"No Quark rows: `import quark` failed ({missing}).")
            progress(notes[-1])

        def text() -> str:
            body = section(setup, model_bytes, parameters, calib_seconds, build_rise, base, rows, len(recipes))
            return body + (quark_section(quark_rows, weight_table, notes) if args.quark else "")

        for recipe in recipes:
            progress(f"quantize {recipe}")
            out = root / (f"q-{recipe}" if setup.legacy else f"{setup.calib_name}-q-{recipe}")
            shutil.rmtree(out, ignore_errors=True)
            peak, manifest, seconds = quantize_peak(root / setup.calib_name, recipe, out, setup.device, tuple(setup.placement_args))
            rows.append(table_row(recipe, peak, base, model_bytes, manifest, setup))
            progress(" | ".join(rows[-1]))
            checkpoints = [out]
            if args.quark and recipe not in QUARK_SCALE_RECIPES:
                notes.append(f"{recipe}: no Quark row (`--quark` compares the INT8 per-tensor recipes {', '.join(QUARK_SCALE_RECIPES)}).")
            elif args.quark:
                quark_rows.append(diffquant_quark_row(recipe, "diffquant", peak, seconds, model_bytes, manifest))
                variant = quark_equal_variant(recipe)
                recipe_file = root / f"{recipe}-{variant.removeprefix('diffquant ').replace(' ', '-')}.yaml"
                recipe_file.write_text(yaml.safe_dump(diffquant_recipe(recipe, variant), sort_keys=False))
                progress(f"quantize {recipe} as {variant}")
                variant_out = out.with_name(f"{out.name}-{recipe_file.stem.removeprefix(recipe + '-')}")
                shutil.rmtree(variant_out, ignore_errors=True)
                v_peak, v_manifest, v_seconds = quantize_peak(root / setup.calib_name, str(recipe_file), variant_out, setup.device,
                                                              tuple(setup.placement_args))
                rows.append(table_row(f"{recipe} ({variant.removeprefix('diffquant ')})", v_peak, base, model_bytes, v_manifest, setup))
                quark_rows.append(diffquant_quark_row(recipe, variant, v_peak, v_seconds, model_bytes, v_manifest))
                checkpoints.append(variant_out)
                if missing is None:
                    progress(f"Quark {recipe}")
                    result = quark_run(root / setup.calib_name, recipe, checkpoints, root / f"quark-{recipe}-layers.json", setup.device)
                    (root / f"quark-{recipe}.json").write_text(json.dumps(result, indent=1) + "\n")
                    quark_rows.append(quark_row(recipe, result, model_bytes))
                    weight_table += weight_rows(recipe, result, ["diffquant", variant])
                for row in quark_rows[-3:]:
                    progress(" | ".join(row))
            if args.drop_checkpoints:
                for checkpoint in checkpoints:
                    shutil.rmtree(checkpoint, ignore_errors=True)
            if args.table is not None:
                write_table(args.table, text())
        print(text(), end="")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
