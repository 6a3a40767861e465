"""The two stages: calibrate (capture submodule inputs to disk) and quantize (read them back)."""
