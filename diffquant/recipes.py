"""Quantization recipes by name: the shipped ones in `configs/quant/` (or `$DIFFQUANT_CONFIGS/quant`).

`diffquant.quant.recipe` parses and validates a recipe file and knows nothing of where the
project keeps its files; this module maps a name to its file.

Example:
    >>> "int8_w8a8" in available_recipes()
    True
    >>> load_recipe("int8_w8a8").global_spec.weight.dtype
    'int8'
"""

from __future__ import annotations

from pathlib import Path

from diffquant.errors import ConfigError
from diffquant.paths import CONFIG_DIR
from diffquant.quant.recipe import Recipe, load_recipe_file


def available_recipes() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / "quant" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}", f"use a recipe file or one of {', '.join(available_recipes())}")
    return load_recipe_file(path)
