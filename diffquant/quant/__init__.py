"""Quantization: number formats, observers, specs and recipes, quantized modules, algorithms."""
