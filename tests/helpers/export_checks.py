"""Checking exports with a runtime's own code: held-out samples, reference outputs, and a
subprocess that runs plain diffusers (never importing diffquant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.eval.metrics import sqnr_db
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.eval.measure import submodule_output


def held_out_samples(result: Any, calib: Path) -> list[dict[str, Any]]:
    """The quantize run's held-out calibration samples (never used to calibrate)."""
    artifact = CalibrationArtifact(calib)
    ids = set(result.manifest["calibration"]["holdout_sample_ids"])
    return [artifact.sample(i) for i, record in enumerate(artifact.records) if record.id in ids]


def outputs(model: torch.nn.Module, samples: list[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [submodule_output(model(**sample)).float() for sample in samples]


def float_outputs(model_name: str, samples: list[dict[str, Any]]) -> list[torch.Tensor]:
    return outputs(load_submodule(resolve_model(model_name)), samples)


def sqnr(reference: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    return sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([a.flatten() for a in approx]))


def run_without_diffquant(script: str, *args: str) -> str:
    """Run `script` in a fresh interpreter with `sys.argv[1:] = args`; it must not import diffquant
    (the script asserts it), so PYTHONPATH does not point at the worktree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def to_plain(sample: Any) -> Any:
    """A sample with every tensor copied out of the memory-mapped shard (for torch.save)."""
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    if isinstance(sample, dict):
        return {k: to_plain(v) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(to_plain(v) for v in sample)
    return sample


def wide_flux_pipeline(root: Path) -> Path:
    """tiny-flux with a 128-wide transformer (2 heads of 64, one double and one single block):
    the smallest Flux whose Linear layers fill nunchaku's 128 x 128 MMA tiles. Returns the
    pipeline directory (built once under `root`)."""
    import shutil

    from diffusers import FluxTransformer2DModel

    from diffquant.models.tiny import tiny_pipeline_dir

    out = root / "tiny-flux-wide"
    if not out.exists():
        tmp = root / "tiny-flux-wide.tmp"
        shutil.copytree(tiny_pipeline_dir("flux"), tmp)
        shutil.rmtree(tmp / "transformer")
        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
                                       num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                                       axes_dims_rope=(16, 24, 24))
        model.to(torch.bfloat16).save_pretrained(tmp / "transformer")
        tmp.rename(out)
    return out
