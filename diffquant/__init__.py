"""diffquant: post-training quantization of diffusion models with on-disk calibration artifacts.

Stage one (`diffquant.stages.calibrate`) captures the inputs of a pipeline's heavy submodule to
resumable shards; stage two (`diffquant.stages.quantize`) reads them back memory-mapped and writes
a quantized safetensors checkpoint with a scale manifest.

In Python, both stages work on the pipeline already in your notebook (`diffquant.api` has the
runnable example), and a checkpoint goes back into it:

    >>> import diffquant
    >>> artifact = diffquant.calibrate(pipe, pipe.unet, prompts, "artifacts/calib/mine", guidance_scale=8.0)  # doctest: +SKIP
    >>> pipe.unet = diffquant.quantize(pipe.unet, artifact, "int8_w8a8")  # doctest: +SKIP
    >>> report = diffquant.load_quantized(pipe, "artifacts/demo/int8_w8a8")  # doctest: +SKIP
    >>> diffquant.save(pipe.unet, "my-checkpoint")  # doctest: +SKIP

(`diffquant.models.quantized` has the runnable examples.) The names are imported on first use,
so `import diffquant` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "calibrate": ("diffquant.api", "calibrate"),
    "quantize": ("diffquant.api", "quantize"),
    "Recipe": ("diffquant.quant.recipe", "Recipe"),
    "LayerSpec": ("diffquant.quant.spec", "LayerSpec"),
    "TensorSpec": ("diffquant.quant.spec", "TensorSpec"),
    "SVDQuantConfig": ("diffquant.quant.recipe", "SVDQuantConfig"),
    "CalibrationSelection": ("diffquant.quant.recipe", "CalibrationSelection"),
    "load_quantized": ("diffquant.models.quantized", "load_quantized"),
    "save": ("diffquant.models.quantized", "save_quantized"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffquant' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
