"""Recorded sha256s are checked: `diffquant verify`, quantize's shard check, checkpoint loading, the weights fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffquant.artifacts import checkpoint
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import WEIGHTS_NAME, checkpoint_verification, load_checkpoint_tensors, read_checkpoint_manifest
from diffquant.errors import ArtifactError
from diffquant.artifacts.fingerprint import weights_fingerprint
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from tests.helpers.reliability import copy_artifact, flip_byte, run_cli

QUANTIZE = ["quantize", "--recipe", "int8_w8a8", "--device", "cpu", "--holdout", "2", "--json"]


def test_verify_passes_on_untouched_artifacts_and_checkpoints(calib_factory, quantize_factory) -> None:
    for target in (calib_factory(), quantize_factory("tiny-sdxl", "int8_w8a8").out):
        result = run_cli(["verify", str(target)])
        assert result.exit_code == 0 and result.output.startswith("ok: "), result.output


def test_one_byte_flip_in_a_shard_is_caught_by_verify_and_by_quantize(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_size_mb=0.000001), tmp_path / "calib")
    shards = sorted(calib.glob("shard-*"))
    flip_byte(shards[0])
    flip_byte(shards[2], 5)
    result = run_cli(["verify", str(calib)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"mismatch: {shard}: sha256 differs from the manifest's" for shard in (shards[0], shards[2])]
    refused = run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2 and f"calibration shard {shards[0]} fails its sha256 check" in refused.output
    assert not (tmp_path / "out").exists()
    skipped = run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out"), "--no-verify"])
    assert skipped.exit_code == 0, skipped.output


def test_one_byte_flip_in_a_stats_file_is_caught_by_verify(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    assert run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out")]).exit_code == 0
    stats = sorted((calib / "stats").glob("*.safetensors"))
    assert stats
    flip_byte(stats[0])
    result = run_cli(["verify", str(calib)])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"mismatch: {stats[0]}: sha256 differs from {calib / 'stats'}/index.json"]


def test_one_byte_flip_in_checkpoint_weights_is_caught_on_load_and_by_verify(quantize_factory, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_w8a8").out, out)
    flip_byte(out / WEIGHTS_NAME)
    result = run_cli(["verify", str(out)])
    assert result.exit_code == 1 and "fails its sha256 check" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        load_checkpoint_tensors(out)
    with checkpoint_verification(False):
        assert load_checkpoint_tensors(out)


def test_checkpoint_hash_is_computed_once_per_file(quantize_factory, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ckpt"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_w8a8").out, out)
    calls = []
    original = checkpoint.file_sha256
    monkeypatch.setattr(checkpoint, "file_sha256", lambda path: calls.append(path) or original(path))
    read_checkpoint_manifest(out)
    load_checkpoint_tensors(out)
    read_checkpoint_manifest(out)
    assert calls == [out / WEIGHTS_NAME]


def test_weights_fingerprint_sees_a_fused_update_and_quantize_refuses_the_changed_model(calib_factory) -> None:
    preset = resolve_model("tiny-sdxl")
    model = load_submodule(preset)
    artifact = CalibrationArtifact(calib_factory())
    artifact.check_model(model)
    before = weights_fingerprint(model)
    assert weights_fingerprint(load_submodule(preset)) == before
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():  # a rank-1 "LoRA" fused into one layer changes every element of it
        layer.weight.add_(torch.outer(torch.ones(layer.weight.shape[0]), torch.full((layer.weight.shape[1],), 1e-3)))
    assert weights_fingerprint(model) != before
    with pytest.raises(ArtifactError, match="differs in its weights"):
        artifact.check_model(model)


def test_calibrate_does_not_call_a_run_of_changed_weights_complete(tmp_path: Path) -> None:
    from diffquant.models.tiny import tiny_pipeline_dir

    pipeline = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir("sd15"), pipeline)
    args = ["calibrate", "--model", str(pipeline), "--num-prompts", "1", "--steps", "2", "--out", str(tmp_path / "run"), "--json"]
    assert run_cli(args).exit_code == 0, "first run"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(1.01)
    unet.save_pretrained(pipeline / "unet")
    result = run_cli(args)
    assert result.exit_code == 2 and "whose weights differ" in result.output, result.output


def _rewrite_stats(calib: Path, prefix: str, change) -> None:
    """Apply `change` to one cached statistics file, and record its new size and sha256 in the
    index: a tampering the hash check cannot see."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    (stats_file,) = (calib / "stats").glob(f"{prefix}-*.safetensors")
    save_file({name: change(name, t) for name, t in load_file(stats_file).items()}, str(stats_file))
    index_path = calib / "stats" / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["entries"].values():
        if entry["file"] == stats_file.name:
            entry.update(bytes=stats_file.stat().st_size, sha256=hashlib.sha256(stats_file.read_bytes()).hexdigest())
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# (statistic file, recipe that reads it, tensor names changed, factor): every layer changed alike.
STATS_TAMPERING = {
    "range-narrowed": ("range", "int8_w8a8", ("/min", "/max"), 0.01),
    "range-widened": ("range", "int8_w8a8", ("/min", "/max"), 100.0),
    "range-widened-a-little": ("range", "int8_w8a8", ("/max",), 1.01),
    "channel-absmax-widened": ("channel_absmax", "svdquant_w4a16", ("/channel_absmax",), 4.0),
    "rows-scaled": ("rows", "svdquant-search-alpha", ("/rows",), 1.5),
}


@pytest.mark.parametrize("case", sorted(STATS_TAMPERING))
def test_stats_altered_together_with_their_hash_are_refused_in_one_line(case: str, calib_factory, tmp_path: Path) -> None:
    from diffquant.stages.quantize import QuantizeSettings, quantize

    prefix, recipe, fields, factor = STATS_TAMPERING[case]
    if recipe == "svdquant-search-alpha":  # the one statistic kind only an alpha search reads
        source = (Path(__file__).parents[1] / "configs" / "quant" / "svdquant_w4a16.yaml").read_text()
        assert "search_alpha: false" in source
        recipe = str(tmp_path / "search-alpha.yaml")
        Path(recipe).write_text(source.replace("search_alpha: false", "search_alpha: true"))
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    args = ["quantize", "--calib", str(calib), "--recipe", recipe, "--device", "cpu", "--holdout", "2", "--json"]
    honest = run_cli([*args, "--out", str(tmp_path / "honest")])
    assert honest.exit_code == 0, honest.output
    again = quantize(QuantizeSettings(calib=calib, recipe=recipe, out=tmp_path / "again", device="cpu", holdout=2), show_progress=False)
    assert prefix in again.manifest["stats_cache"]["hits"]  # the untouched cache passes its check
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == (tmp_path / "honest" / WEIGHTS_NAME).read_bytes()
    _rewrite_stats(calib, prefix, lambda name, t: t * factor if name.endswith(fields) else t)
    result = run_cli([*args, "--out", str(tmp_path / "tampered")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert f"the cached {prefix} statistic of layer" in lines[0] and "the cache was altered" in lines[0] and "--no-stats-cache" in lines[0]
    assert not (tmp_path / "tampered" / WEIGHTS_NAME).exists()
    clean = run_cli([*args, "--out", str(tmp_path / "clean"), "--no-stats-cache"])
    assert clean.exit_code == 0 and (tmp_path / "clean" / WEIGHTS_NAME).read_bytes() == (tmp_path / "honest" / WEIGHTS_NAME).read_bytes()


def test_stats_whose_witnesses_were_removed_are_refused(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    args = ["quantize", "--calib", str(calib), "--recipe", "int8_w8a8", "--device", "cpu", "--holdout", "2", "--json"]
    assert run_cli([*args, "--out", str(tmp_path / "first")]).exit_code == 0
    _rewrite_stats(calib, "range", lambda name, t: torch.full_like(t, 10**6) if name.endswith("/witness_max") else t)
    result = run_cli([*args, "--out", str(tmp_path / "second")])
    assert result.exit_code == 2 and "has no valid witness samples" in result.output, result.output


def test_verify_checks_an_artifact_in_a_store(calib_factory) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    source = calib_factory()
    for path in source.iterdir():
        if path.is_file():
            fs.pipe_file(f"/verify-store/calib/{path.name}", path.read_bytes())
    url = "memory://verify-store/calib"
    assert run_cli(["verify", url]).exit_code == 0
    shard = next(p.name for p in source.glob("shard-*"))
    data = bytearray(fs.cat_file(f"/verify-store/calib/{shard}"))
    data[-1] ^= 0x10
    fs.pipe_file(f"/verify-store/calib/{shard}", bytes(data))
    result = run_cli(["verify", url])
    assert result.exit_code == 1 and result.output.strip() == f"mismatch: {url}/{shard}: sha256 differs from the manifest's"


def test_one_byte_flip_in_a_zarr_shard_is_caught_by_verify(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=2, steps=2, shard_format="zarr"), tmp_path / "calib")
    assert run_cli(["verify", str(calib)]).exit_code == 0
    shard = next(calib.glob("shard-*.zarr"))
    chunk = max((p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    flip_byte(chunk, offset_from_end=chunk.stat().st_size // 2)
    result = run_cli(["verify", str(calib)])
    assert result.exit_code == 1 and result.output.strip() == f"mismatch: {calib}/{shard.name}: sha256 differs from the manifest's", result.output


def test_stats_cached_with_another_thread_count_pass_the_witness_check(calib_factory, tmp_path: Path) -> None:
    from diffquant.stages.quantize import QuantizeSettings, quantize

    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    settings = dict(calib=calib, recipe="int8_w8a8", device="cpu", holdout=2)
    quantize(QuantizeSettings(out=tmp_path / "one-thread", **settings), show_progress=False)  # the cache, summed with 1 thread
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # another reduction order: the recomputed witness samples differ in the last bits
    try:
        again = quantize(QuantizeSettings(out=tmp_path / "three-threads", **settings), show_progress=False)
    finally:
        torch.set_num_threads(previous)
    assert "range" in again.manifest["stats_cache"]["hits"] and again.manifest["stats_cache"]["computed"] == []
