"""Comparing calibration samples in tests: bit-exact equality of nested kwargs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.calibration_reader import CalibrationArtifact


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested samples: dtype, shape and bytes of every tensor, type and value
    of every constant, and tuple vs list kept apart."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def all_samples(path: Path) -> list[tuple[int, int, Any]]:
    """(prompt, step, sample) for every sample of an artifact, in order."""
    artifact = CalibrationArtifact(path)
    return [(r.prompt, r.step, artifact.sample(i)) for i, r in enumerate(artifact.records)]
