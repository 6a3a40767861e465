"""Shared fixtures: tiny pipelines and small calibration artifacts, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffquant.stages.calibrate import CalibrationSettings, calibrate


@pytest.fixture(scope="session")
def calib_factory(tmp_path_factory: pytest.TempPathFactory):
    """Calibrate a tiny model once per distinct settings; returns the artifact directory."""
    cache: dict[tuple, Path] = {}

    def make(model: str = "tiny-sdxl", num_prompts: int = 3, steps: int = 2, **extra) -> Path:
        key = (model, num_prompts, steps, tuple(sorted(extra.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"calib-{model}")
            calibrate(CalibrationSettings(model=model, out=out, num_prompts=num_prompts, steps=steps, **extra), show_progress=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and oversubscribed cores make them 100x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def private_calib(calib_factory, tmp_path_factory: pytest.TempPathFactory):
    """A private copy of a `calib_factory` artifact: quantize writes its stats cache beside the
    artifact, and the shared artifacts must stay exactly as calibrate left them."""
    import shutil

    cache: dict[tuple, Path] = {}

    def make(model: str = "tiny-sdxl", num_prompts: int = 3, steps: int = 2, **extra) -> Path:
        key = (model, num_prompts, steps, tuple(sorted(extra.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"private-calib-{model}") / "calib"
            shutil.copytree(calib_factory(model, num_prompts, steps, **extra), out, ignore=shutil.ignore_patterns("stats"))
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def quantize_factory(private_calib, tmp_path_factory: pytest.TempPathFactory):
    """Quantize a tiny model (3 prompts x 2 steps, 2 samples held out) once per (model, recipe);
    returns the QuantizeResult. Tests must not modify the result's model or files."""
    from diffquant.stages.quantize import QuantizeSettings, quantize

    cache: dict[tuple[str, str], object] = {}

    def make(model: str, recipe: str):
        key = (model, recipe)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"quantized-{model}-{Path(recipe).stem}")
            cache[key] = quantize(QuantizeSettings(calib=private_calib(model), recipe=recipe, out=out, device="cpu", holdout=2), show_progress=False)
        return cache[key]

    return make
