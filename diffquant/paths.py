"""Where the project's configs, default outputs and caches live."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("DIFFQUANT_CONFIGS", PROJECT_ROOT / "configs"))
ARTIFACTS_DIR = PROJECT_ROOT / "artifacts"


def tiny_model_cache() -> Path:
    """Directory holding the built tiny pipelines (`DIFFQUANT_CACHE` overrides it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffquant" / "tiny"
    return Path(os.environ.get("DIFFQUANT_CACHE", default))


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def newest_calibration(model: str) -> Path:
    """The most recently completed calibration artifact of `model` under artifacts/calib/."""
    import json

    from diffquant.errors import ArtifactError

    candidates = []
    for manifest in (ARTIFACTS_DIR / "calib").glob("*/manifest.json"):
        try:
            content = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if content.get("status") == "complete" and content.get("model", {}).get("name") == model:
            candidates.append((manifest.stat().st_mtime, manifest.parent))
    if not candidates:
        raise ArtifactError(
            f"no complete calibration artifact of model {model!r} under {ARTIFACTS_DIR / 'calib'}",
            f"run `make calibrate MODEL={model}` first, or pass --calib DIR",
        )
    return max(candidates)[1]
