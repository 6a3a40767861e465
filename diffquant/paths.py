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
