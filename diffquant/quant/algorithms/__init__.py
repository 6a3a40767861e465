"""Algorithms that transform a layer before its weight is quantized (SVDQuant)."""
