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
