"""Evaluate a stored quantized checkpoint against the unquantized model; `sweep` and `eval` share it.

Two groups of figures, each recomputed from the checkpoint on disk (the manifest's own quality
block is never trusted):

* held-out figures: the held-out calibration samples recorded in the checkpoint manifest
  (`calibration.holdout_sample_ids`, never seen by the observers) run through the unquantized
  submodule; each quantized layer sees the same inputs as the layer it replaces, which gives the
  per-layer output SQNR, and the whole quantized submodule on the same samples gives the submodule
  output SQNR. The arithmetic is `measure_layers` / `measure_output` of `eval.measure`, as in quantize, so a
  checkpoint that reloads exactly reproduces the figures quantize measured.
* image figures: the pipeline generates each (prompt, seed) of an `EvalPrompts` set once with the
  unquantized submodule (the reference) and once per checkpoint with the target swapped for the
  reloaded quantized submodule; PSNR and SSIM (`diffquant.eval.metrics`) are averaged over images.

SQNR figures follow the manifest's convention: JSON null means an exact match (+inf dB). An image
PSNR of +inf (identical images) is also written as null.

Example (a tiny model, calibrated and quantized first):
    >>> import tempfile
    >>> from diffquant.stages.calibrate import CalibrationSettings, calibrate
    >>> from diffquant.stages.quantize import QuantizeSettings, quantize
    >>> workdir = tempfile.TemporaryDirectory()
    >>> root = Path(workdir.name)
    >>> _ = calibrate(CalibrationSettings(model="tiny-sdxl", out=root / "calib", num_prompts=2, steps=2, device="cpu"), show_progress=False)
    >>> _ = quantize(QuantizeSettings(calib=root / "calib", recipe="int8_w8a8", out=root / "w8a8", device="cpu", holdout=1), show_progress=False)
    >>> artifact = CalibrationArtifact(root / "calib")
    >>> preset = evaluation_preset(artifact.manifest["model"], artifact)
    >>> evaluator = CheckpointEvaluator(preset, "cpu", EvalPrompts.build(num_prompts=1, seeds=(0,), steps=2))
    >>> record = evaluator.evaluate(root / "w8a8", artifact)
    >>> sorted(k for k in record if k.endswith("_db"))
    ['median_layer_output_sqnr_db', 'output_sqnr_db', 'psnr_db', 'worst_layer_output_sqnr_db']
    >>> record["holdout_samples"], record["output_sqnr_db"] > 15, 0.5 < record["ssim"] <= 1
    (1, True, True)
    >>> workdir.cleanup()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, calibration_loader
from diffquant.artifacts.checkpoint_records import CheckpointManifest
from diffquant.artifacts.sample_split import indices_of_ids
from diffquant.errors import ConfigError, DiffquantError
from diffquant.eval.measure import measure_layers, measure_output, median_and_worst
from diffquant.eval.metrics import psnr, ssim
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import ModelPreset, preset_of_artifact
from diffquant.models.submodule import load_submodule
from diffquant.prompts import load_prompts
from diffquant.quant.spec import TensorSpec
from diffquant.models.quantized import load_quantized_submodule

DEFAULT_EVAL_PROMPTS = 3
DEFAULT_SEEDS = (0, 1)


@dataclass(frozen=True)
class EvalPrompts:
    """The fixed images of an evaluation: every prompt with every seed, `steps` denoising steps.

    Each image uses the generator `seeded_generator(seed, 0)`, as `diffquant generate --seed S`
    does, so any cell of a grid can be regenerated on its own.
    """

    source: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int | None  # None: the model preset's

    @classmethod
    def build(cls, source: str | None = None, num_prompts: int = DEFAULT_EVAL_PROMPTS, seeds: Sequence[int] = DEFAULT_SEEDS,
              steps: int | None = None) -> EvalPrompts:
        """The first `num_prompts` prompts of `source` (default: the built-in prompts)."""
        if not seeds:
            raise ConfigError("no seeds given for the evaluation images", "pass e.g. --seeds 0,1")
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps {steps} is not allowed", "pass --steps >= 1")
        prompt_set = load_prompts(source, num_prompts)
        return cls(source=prompt_set.source, prompts=prompt_set.prompts, seeds=tuple(int(s) for s in seeds), steps=steps)

    def cases(self) -> list[tuple[str, int]]:
        """(prompt, seed) per image, in grid column order: prompts outer, seeds inner."""
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def labels(self) -> list[str]:
        return [f"seed {seed}: {prompt}" for prompt, seed in self.cases()]

    def describe(self, preset: ModelPreset) -> dict[str, Any]:
        return {"source": self.source, "prompts": list(self.prompts), "seeds": list(self.seeds),
                "steps": self.steps or preset.steps, "pipeline_kwargs": dict(preset.pipeline_kwargs)}


class CheckpointEvaluator:
    """What every checkpoint of one model is compared with: the unquantized submodule and, with
    `prompts`, one pipeline and its reference images (loaded and generated once, on first use).

    The unquantized submodule is the pipeline's own target when images are evaluated (one copy of
    the weights), or the submodule loaded alone when they are not.
    """

    def __init__(self, preset: ModelPreset, device: str, prompts: EvalPrompts | None, show_progress: bool = False) -> None:
        self.preset = preset
        self.device = device
        self.prompts = prompts
        self.show_progress = show_progress
        self._pipe: Any = None
        self._fp_module: torch.nn.Module | None = None
        self._reference: list[Image.Image] | None = None

    @property
    def fp_module(self) -> torch.nn.Module:
        if self._fp_module is None:
            self._fp_module = get_target(self.pipe, self.preset) if self.prompts is not None else load_submodule(self.preset, device=self.device)
        return self._fp_module

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = load_pipeline(self.preset, device=self.device)
        return self._pipe

    @property
    def reference_images(self) -> list[Image.Image]:
        """The unquantized pipeline's images of every (prompt, seed), generated once."""
        if self._reference is None:
            self._reference = self.generate(self.fp_module, "reference images")
        return self._reference

    def evaluate(self, checkpoint: Path, artifact: CalibrationArtifact | None, holdout_note: str | None = None) -> dict[str, Any]:
        """The figures of one stored checkpoint (see the module docstring), plus its images.

        `artifact` is the calibration artifact the checkpoint was quantized from; None skips the
        held-out figures (`holdout_note` then says why). Returns a record whose scalar keys are
        `RECORD_COLUMNS`, plus `layers` (per-layer figures in model order), `image_figures`
        (per image), `images` (PIL, not serialisable: pop it before writing JSON) and `holdout`.
        """
        module, manifest = load_quantized_submodule(checkpoint, self.device, self.preset)
        record = checkpoint_facts(manifest, checkpoint)
        if artifact is not None and not manifest.holdout_sample_ids:
            record["holdout"] = {"status": "skipped", "reason": "the checkpoint was quantized with the quality report off (--holdout 0)"}
        elif artifact is not None:
            held = holdout_figures(self.fp_module, module, manifest, artifact, self.device, self.show_progress)
            record.update(held)
            record["holdout"] = {"status": "evaluated", "samples": held["holdout_samples"], "artifact": str(artifact.path)}
        else:
            record["holdout"] = {"status": "skipped", "reason": holdout_note or "no calibration artifact"}
        if self.prompts is not None:
            images = self.generate(module, f"images {record['recipe']}")
            record.update(image_figures(self.reference_images, images, self.prompts))
            record["images"] = images
        return record

    def generate(self, module: torch.nn.Module, desc: str) -> list[Image.Image]:
        """The pipeline's images of every (prompt, seed) with its target set to `module`; the
        original target is put back afterwards, whatever happens."""
        if self.prompts is None:
            raise ConfigError("image evaluation is off", "drop --no-images")
        pipe, target = self.pipe, self.preset.target
        original = get_target(pipe, self.preset)
        setattr(pipe, target, module)
        images = []
        try:
            with torch.inference_mode():
                for prompt, seed in tqdm(self.prompts.cases(), desc=desc, unit="image", disable=not self.show_progress, leave=False):
                    result = pipe(prompt, num_inference_steps=self.prompts.steps or self.preset.steps,
                                  generator=seeded_generator(seed, 0, self.device), **self.preset.pipeline_kwargs)
                    images.append(result.images[0])
        finally:
            setattr(pipe, target, original)
        return images


RECORD_COLUMNS = (
    "recipe", "weight_format", "activation_format", "checkpoint_bytes", "fp16_bytes", "ratio_vs_fp16", "quantized_weights_ratio_vs_fp16",
    "output_sqnr_db", "median_layer_output_sqnr_db", "worst_layer_output_sqnr_db", "holdout_samples",
    "psnr_db", "ssim", "quantize_seconds",
)


def checkpoint_facts(manifest: CheckpointManifest, checkpoint: Path) -> dict[str, Any]:
    """What the manifest states rather than measures: recipe, formats, sizes, quantize time."""
    config = manifest.quantization_config
    weight = TensorSpec(**config["global"]["weight"])
    act = config["global"].get("input")
    sizes = manifest.sizes
    record = {column: None for column in RECORD_COLUMNS}
    record.update(
        checkpoint=str(checkpoint),
        recipe=config["recipe"],
        weight_format=f"{weight.dtype} {_granularity(weight)}",
        activation_format=_activation_format(TensorSpec(**act) if act else None, manifest.model["torch_dtype"]),
        checkpoint_bytes=sizes["checkpoint_bytes"],
        fp16_bytes=sizes["fp16_bytes"],
        ratio_vs_fp16=sizes.get("ratio_vs_fp16"),
        quantized_weights_ratio_vs_fp16=sizes.get("quantized_weights_ratio_vs_fp16"),  # absent from older checkpoints
        quantize_seconds=(manifest.timing or {}).get("quantize_seconds"),
    )
    return record


def holdout_figures(fp_module: torch.nn.Module, quantized: torch.nn.Module, manifest: CheckpointManifest, artifact: CalibrationArtifact,
                    device: str, show_progress: bool = False) -> dict[str, Any]:
    """Submodule output SQNR and per-layer weight/output SQNR on the manifest's held-out samples."""
    artifact.check_model(fp_module)
    indices = indices_of_ids(artifact.records, manifest.holdout_sample_ids, str(artifact.path))
    modules = dict(quantized.named_modules())
    layers = {record.name: modules[record.name] for record in manifest.layers}

    def samples() -> Any:
        return calibration_loader(CalibrationDataset(artifact, indices=indices), device)

    quality, fp_outputs = measure_layers(fp_module, layers, samples(), show_progress=False)
    output_sqnr = measure_output(quantized, fp_outputs, samples())
    order = {name: k for k, (name, _) in enumerate(fp_module.named_modules())}
    per_layer = [{"name": name, **quality[name]} for name in sorted(quality, key=order.__getitem__)]
    median, worst = median_and_worst([entry["output_sqnr_db"] for entry in per_layer])
    return {"output_sqnr_db": output_sqnr, "median_layer_output_sqnr_db": median, "worst_layer_output_sqnr_db": worst,
            "holdout_samples": len(indices), "layers": per_layer}


def image_figures(reference: Sequence[Image.Image], images: Sequence[Image.Image], prompts: EvalPrompts) -> dict[str, Any]:
    """Mean PSNR (dB, data range 1) and mean SSIM of `images` against `reference`, and each image's."""
    per_image = []
    for (prompt, seed), ref, image in zip(prompts.cases(), reference, images, strict=True):
        per_image.append({"prompt": prompt, "seed": seed, "psnr_db": psnr(ref, image), "ssim": ssim(ref, image)})
    mean_psnr = sum(entry["psnr_db"] for entry in per_image) / len(per_image)
    mean_ssim = sum(entry["ssim"] for entry in per_image) / len(per_image)
    for entry in per_image:
        entry["psnr_db"] = _finite_or_none(entry["psnr_db"])
    return {"psnr_db": _finite_or_none(mean_psnr), "ssim": mean_ssim, "image_figures": per_image}


def evaluation_preset(model_info: dict[str, Any], artifact: CalibrationArtifact | None = None) -> ModelPreset:
    """The model a checkpoint or artifact records (`preset_of_artifact`), with the steps and pipeline
    kwargs to generate with: those of the shipped preset of the same name and source (as `diffquant
    generate --model` uses), else those the calibration ran with, when its artifact is at hand."""
    return preset_of_artifact(model_info, artifact.manifest.get("pipeline") if artifact is not None else None)


def open_calibration(path: str | Path | None, expected_sha256: str | None) -> tuple[CalibrationArtifact | None, str | None]:
    """(artifact, None) when `path` holds the calibration artifact a checkpoint names, else
    (None, why not): the held-out figures are then skipped, not faked."""
    if path is None:
        return None, "the checkpoint names no calibration artifact"
    try:
        artifact = CalibrationArtifact(path)
    except DiffquantError as exc:
        return None, f"calibration artifact {path} cannot be opened ({exc.message})"
    if expected_sha256 is not None and artifact.manifest_sha256 != expected_sha256:
        return None, f"calibration artifact {path} is not the one the checkpoint was quantized from (manifest sha256 differs)"
    return artifact, None


def _granularity(spec: TensorSpec) -> str:
    return {"per_tensor": "tensor", "per_channel": "channel", "per_token": "token"}.get(spec.granularity, f"g{spec.group_size}")


def _activation_format(spec: TensorSpec | None, model_dtype: str) -> str:
    if spec is None:
        return model_dtype
    mode = "dynamic" if spec.dynamic else spec.observer
    return f"{spec.dtype} {_granularity(spec)} {mode}"


def _finite_or_none(value: float) -> float | None:
    return None if value == math.inf else value
