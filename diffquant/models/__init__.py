"""Model presets (configs/models/*.yaml) and the builder of tiny offline pipelines."""
