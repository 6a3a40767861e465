"""Identify a submodule by class and config, so artifacts can be matched to the model they came from."""

from __future__ import annotations

from typing import Any

import torch

from diffquant.artifacts.calibration_format import json_sha256


def module_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """`{"class": ..., "config_sha256": ...}` of a diffusers model.

    The hash covers the model's config without private keys (`_name_or_path`, `_diffusers_version`),
    so the same architecture loaded from another directory or by another diffusers version matches.
    """
    config = getattr(module, "config", None) or {}
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return {"class": type(module).__name__, "config_sha256": json_sha256(public)}
