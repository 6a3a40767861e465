"""diffquant: post-training quantization of diffusion models with on-disk calibration artifacts.

Stage one (`diffquant.stages.calibrate`) captures the inputs of a pipeline's heavy submodule to
resumable shards; stage two (`diffquant.stages.quantize`) reads them back memory-mapped and writes
a quantized safetensors checkpoint with a scale manifest.
"""

__version__ = "0.1.0"
