"""The zarr shard backend and `diffquant convert`: same samples, same checkpoints, same guarantees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.cli import main
from diffquant.errors import ArtifactError, ConfigError
from diffquant.stages.calibrate import CalibrationSettings
from diffquant.stages.quantize import QuantizeSettings, quantize
from tests.helpers.samples import all_samples as _samples
from tests.helpers.samples import same as _same

HELPER = Path(__file__).parent / "helpers" / "calibrate_then_die.py"


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc"])
def test_zarr_samples_equal_safetensors_samples_bf16_included(compression: str, calib_factory) -> None:
    reference = calib_factory("tiny-flux", num_prompts=2, steps=2)
    zarr_dir = calib_factory("tiny-flux", num_prompts=2, steps=2, shard_format="zarr", compression=compression)
    assert (next(zarr_dir.glob("shard-*.zarr")) / "zarr.json").is_file()
    got, want = _samples(zarr_dir), _samples(reference)
    assert any(t.dtype == torch.bfloat16 for *_, s in got for t in s.values() if isinstance(t, torch.Tensor))
    assert _same(got, want)
    attrs = json.loads((next(zarr_dir.glob("shard-*.zarr")) / "k000" / "zarr.json").read_text())["attributes"]
    assert set(attrs) == {"kwarg", "torch_dtype"}


def test_zarr_and_safetensors_quantize_to_identical_checkpoints(calib_factory, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = []
    for shard_format in ("safetensors", "zarr"):
        calib = calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_format=shard_format)
        out = tmp_path / shard_format
        quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=out, device="cpu", holdout=2), show_progress=False)
        tensors.append(load_file(str(out / "model.safetensors")))
    # The files differ only in the header's calibration record (path and manifest hash).
    assert tensors[0].keys() == tensors[1].keys()
    assert all(t.dtype == tensors[1][k].dtype and torch.equal(t, tensors[1][k]) for k, t in tensors[0].items())


def test_convert_round_trip_is_byte_identical(calib_factory, tmp_path: Path) -> None:
    source = calib_factory("tiny-sdxl", num_prompts=3, steps=2)
    as_zarr, back = tmp_path / "z", tmp_path / "s"
    assert CliRunner().invoke(main, ["convert", str(source), str(as_zarr), "--format", "zarr", "--compression", "zstd"]).exit_code == 0
    assert CliRunner().invoke(main, ["convert", str(as_zarr), str(back), "--format", "safetensors"]).exit_code == 0
    for shard in sorted(source.glob("shard-*.safetensors")):
        assert (back / shard.name).read_bytes() == shard.read_bytes()
    manifest = json.loads((as_zarr / MANIFEST_NAME).read_text())
    assert manifest["shard_format"] == {"name": "zarr", "compression": "zstd"}
    assert _same(_samples(as_zarr), _samples(source))
    refused = CliRunner().invoke(main, ["convert", str(source), str(as_zarr), "--format", "zarr"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output


def test_zarr_resume_after_kill_is_bit_identical(calib_factory, tmp_path: Path) -> None:
    reference = calib_factory("tiny-sdxl", num_prompts=4, steps=2, shard_size_mb=0.000001, shard_format="zarr")
    out = tmp_path / "killed"
    args = ["--model", "tiny-sdxl", "--num-prompts", "4", "--steps", "2", "--shard-size-mb", "0.000001", "--format", "zarr", "--out", str(out)]
    killed = subprocess.run([sys.executable, str(HELPER), "publish", "2", "--", *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((out / MANIFEST_NAME).read_text())["num_prompts_done"] == 2
    result = CliRunner().invoke(main, ["calibrate", *args])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.partial"))
    assert _same(_samples(out), _samples(reference))


def test_zarr_corruption_is_an_error_not_a_wrong_value(calib_factory, tmp_path: Path) -> None:
    import shutil

    source = calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_format="zarr")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    chunk = max((p for p in next(broken.glob("shard-*.zarr")).rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    artifact = CalibrationArtifact(broken)
    with pytest.raises(ArtifactError, match="(?i)calibration shard .* failed .*checksum"):
        for index in range(len(artifact)):
            artifact.sample(index)


def test_compression_needs_zarr() -> None:
    with pytest.raises(ConfigError, match="--format zarr"):
        CalibrationSettings(model="tiny-sdxl", compression="zstd")
