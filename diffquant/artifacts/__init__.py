"""On-disk formats: calibration shards with their manifest, and the quantized checkpoint."""
