"""Artifacts in fsspec stores: `memory://` end to end, `file://` URLs, resume and integrity in a store."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.artifacts.calibration_writer import CalibrationWriter
from diffquant.artifacts.location import ArtifactLocation, artifact_target
from diffquant.cli import main
from diffquant.errors import ArtifactError, ConfigError
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.quantize import QuantizeSettings, quantize
from tests.helpers.samples import all_samples, same

TINY = {"model": "tiny-sdxl", "num_prompts": 3, "steps": 2}


@pytest.fixture
def memory_url(request: pytest.FixtureRequest):
    """A fresh `memory://` directory, emptied after the test (the memory store is per process)."""
    url = f"memory://diffquant-tests/{request.node.name.replace('[', '-').rstrip(']')}"
    memory = fsspec.filesystem("memory")
    root = url.removeprefix("memory:/")
    if memory.exists(root):
        memory.rm(root, recursive=True)
    yield url
    if memory.exists(root):
        memory.rm(root, recursive=True)


def _checkpoint_tensors(calib: Path | str, out: Path) -> dict[str, torch.Tensor]:
    quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=out, device="cpu", holdout=2), show_progress=False)
    return load_file(str(out / "model.safetensors"))


def test_memory_store_end_to_end_from_the_command_line(memory_url: str, calib_factory, tmp_path: Path) -> None:
    runner = CliRunner()
    calibrated = runner.invoke(main, ["calibrate", "--model", "tiny-sdxl", "--num-prompts", "3", "--steps", "2", "--format", "zarr",
                                      "--shard-size-mb", "0.02", "--device", "cpu", "--out", memory_url, "--json"])
    assert calibrated.exit_code == 0, calibrated.output
    summary = json.loads(calibrated.output.strip().splitlines()[-1])
    assert summary["path"] == memory_url and summary["status"] == "complete" and summary["num_shards"] > 1

    memory = fsspec.filesystem("memory")
    root = memory_url.removeprefix("memory:/")
    names = sorted(p.rsplit("/", 1)[-1] for p in memory.ls(root, detail=False))
    assert MANIFEST_NAME in names and all(n == MANIFEST_NAME or n.endswith(".zarr") for n in names)

    inspected = runner.invoke(main, ["inspect", memory_url, "--json"])
    assert inspected.exit_code == 0 and json.loads(inspected.output)["num_samples"] == summary["num_samples"]

    out = tmp_path / "q"
    quantized = runner.invoke(main, ["quantize", "--calib", memory_url, "--recipe", "int8_w8a8", "--out", str(out),
                                     "--device", "cpu", "--holdout", "2", "--json"])
    assert quantized.exit_code == 0, quantized.output
    manifest = json.loads((out / "quant_manifest.json").read_text())
    assert manifest["calibration"]["path"] == memory_url
    # The statistics cache lives beside the artifact, in the store.
    assert memory.isfile(f"{root}/stats/index.json")

    # Bit-identical to the single-process local safetensors run of the same settings.
    reference = _checkpoint_tensors(calib_factory(**TINY), tmp_path / "local")
    remote = load_file(str(out / "model.safetensors"))
    assert reference.keys() == remote.keys()
    assert all(torch.equal(t, remote[k]) and t.dtype == remote[k].dtype for k, t in reference.items())

    # A second recipe reads the statistics from the store instead of running the calibration pass.
    again = quantize(QuantizeSettings(calib=memory_url, recipe="int8_w8a8", out=tmp_path / "again", device="cpu", holdout=2),
                     show_progress=False)
    assert again.manifest["stats_cache"]["computed"] == [] and "range" in again.manifest["stats_cache"]["hits"]


@pytest.mark.parametrize("shard_format", ["safetensors", "zarr"])
def test_memory_store_holds_the_bytes_of_a_local_run(shard_format: str, memory_url: str, calib_factory) -> None:
    result = calibrate(CalibrationSettings(**TINY, out=memory_url, shard_format=shard_format), show_progress=False)
    assert result.out == memory_url
    reference = calib_factory(**TINY, shard_format=shard_format)
    assert same(all_samples(memory_url), all_samples(reference))
    local_shards = json.loads((reference / MANIFEST_NAME).read_text())["shards"]
    # Same shards, byte for byte: a safetensors shard is one object, a zarr shard a tree of them.
    assert [(s["file"], s["bytes"], s["sha256"]) for s in result.manifest["shards"]] == [(s["file"], s["bytes"], s["sha256"]) for s in local_shards]


def test_store_shard_hash_equals_local_directory_hash(calib_factory, memory_url: str) -> None:
    local = calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_format="zarr")
    fsspec.filesystem("memory").put(str(local), memory_url.removeprefix("memory:/"), recursive=True)
    location = ArtifactLocation(memory_url)
    manifest = location.read_json(MANIFEST_NAME)
    for shard in manifest["shards"]:
        assert location.size(shard["file"]) == shard["bytes"]
        assert location.sha256(shard["file"]) == shard["sha256"] == ArtifactLocation(local).sha256(shard["file"])


def test_file_url_is_a_local_directory(calib_factory, tmp_path: Path) -> None:
    out = tmp_path / "via-url"
    result = calibrate(CalibrationSettings(**TINY, out=artifact_target(f"file://{out}"), shard_format="zarr"), show_progress=False)
    assert result.out == out and (out / MANIFEST_NAME).is_file()
    assert same(all_samples(f"file://{out}"), all_samples(calib_factory(**TINY)))


def test_interrupted_run_in_a_store_resumes_and_drops_uncommitted_shards(memory_url: str, calib_factory, monkeypatch) -> None:
    settings = CalibrationSettings(**TINY, out=memory_url, shard_format="zarr", shard_size_mb=0.000001)
    original = CalibrationWriter.end_prompt

    def die_at_second_prompt(self: CalibrationWriter, prompt_index: int) -> None:
        original(self, prompt_index)
        if prompt_index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationWriter, "end_prompt", die_at_second_prompt)
    with pytest.raises(KeyboardInterrupt):
        calibrate(settings, show_progress=False)
    monkeypatch.setattr(CalibrationWriter, "end_prompt", original)

    location = ArtifactLocation(memory_url)
    interrupted = location.read_json(MANIFEST_NAME)
    assert interrupted["status"] == "in_progress" and interrupted["num_prompts_done"] == 2
    # Shards written in place whose manifest update never happened (killed between the two): the
    # next one the resumed run writes anyway, and others it would never overwrite.
    strays = [f"shard-{len(interrupted['shards']):06d}.zarr", "shard-000099.zarr", "shard-r001-000000.zarr"]
    for stray in strays:
        location.write_bytes(f"{stray}/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')

    result = calibrate(settings, show_progress=False)
    assert result.resumed_from_prompt == 2 and result.manifest["status"] == "complete"
    listed = {s["file"] for s in result.manifest["shards"]}
    assert {n for n in location.names() if n.startswith("shard-")} == listed and not listed & set(strays[1:])
    assert same(all_samples(memory_url), all_samples(calib_factory(**TINY)))


def test_convert_between_a_store_and_a_local_directory(calib_factory, memory_url: str, tmp_path: Path) -> None:
    source = calib_factory(**TINY)
    back = tmp_path / "back"
    runner = CliRunner()
    assert runner.invoke(main, ["convert", str(source), memory_url, "--format", "zarr", "--compression", "zstd"]).exit_code == 0
    assert runner.invoke(main, ["convert", memory_url, str(back), "--format", "safetensors"]).exit_code == 0
    for shard in sorted(source.glob("shard-*.safetensors")):
        assert (back / shard.name).read_bytes() == shard.read_bytes()
    refused = runner.invoke(main, ["convert", str(source), memory_url, "--format", "zarr"])
    assert refused.exit_code == 2 and "is not empty" in refused.output


def test_damaged_shard_in_a_store_is_caught(calib_factory, memory_url: str) -> None:
    from diffquant.artifacts.calibration_reader import CalibrationArtifact

    calibrate(CalibrationSettings(**TINY, out=memory_url, shard_format="zarr"), show_progress=False)
    location = ArtifactLocation(memory_url)
    shard = location.read_json(MANIFEST_NAME)["shards"][0]["file"]
    chunk = next(p for p in fsspec.filesystem("memory").find(f"{location.root}/{shard}") if "/c/" in p)
    data = bytearray(fsspec.filesystem("memory").cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fsspec.filesystem("memory").pipe_file(chunk, bytes(data))
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        CalibrationArtifact(memory_url, verify=True)
    location.remove(shard)
    with pytest.raises(ArtifactError, match="is missing"):
        CalibrationArtifact(memory_url)


def test_store_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(main, ["inspect", "nosuchprotocol://bucket/calib"])
    assert unknown.exit_code == 2 and "cannot open the store nosuchprotocol://bucket/calib" in unknown.output
    empty = runner.invoke(main, ["quantize", "--calib", "memory://diffquant-tests/nothing-here", "--recipe", "int8_w8a8",
                                 "--out", str(tmp_path / "q")])
    assert empty.exit_code == 2 and "has no manifest.json" in empty.output
    assert len(unknown.output.strip().splitlines()) == 1 and len(empty.output.strip().splitlines()) == 1


def test_memory_store_is_refused_for_data_parallel_ranks() -> None:
    from diffquant.artifacts.calibration_run import check_shared_store

    check_shared_store(ArtifactLocation("memory://x"), world=1)
    check_shared_store(ArtifactLocation("/tmp/x"), world=2)
    with pytest.raises(ConfigError, match="memory:// store"):
        check_shared_store(ArtifactLocation("memory://x"), world=2)


def test_reader_keeps_at_most_two_shards_of_a_store_open(memory_url: str) -> None:
    from diffquant.artifacts.calibration_reader import CalibrationArtifact

    calibrate(CalibrationSettings(**TINY, out=memory_url, shard_size_mb=0.000001), show_progress=False)
    artifact = CalibrationArtifact(memory_url)
    assert len(artifact.manifest["shards"]) == 3
    for index in range(len(artifact)):
        artifact.sample(index)
        assert len(artifact._handles) <= 2
    assert list(artifact._handles) == [s["file"] for s in artifact.manifest["shards"][-2:]]


@pytest.mark.parametrize(("value", "expected"), [
    ("s3://bucket/calib/run/", "s3://bucket/calib/run"),
    ("simplecache::s3://bucket/calib", "simplecache::s3://bucket/calib"),
    ("memory://x", "memory://x"),
    ("file:///tmp/run", Path("/tmp/run")),
    ("file://localhost/tmp/run", Path("/tmp/run")),
    ("local:///tmp/run", Path("/tmp/run")),
    ("runs/a::b", Path("runs/a::b")),
    ("relative/dir", Path("relative/dir")),
])
def test_urls_and_local_paths_are_told_apart(value: str, expected: Path | str) -> None:
    assert artifact_target(value) == expected


def test_a_store_failure_is_one_line_naming_the_url(memory_url: str, monkeypatch) -> None:
    location = ArtifactLocation(memory_url)
    location.write_bytes("a.json", b"{}")

    def unreachable(*args, **kwargs):
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(location.fs, "cat_file", unreachable)
    with pytest.raises(ArtifactError, match=f"reading {memory_url}/a.json failed \\(RuntimeError: connection reset by peer\\)"):
        location.read_bytes("a.json")


def test_object_store_directories_are_not_created(monkeypatch) -> None:
    location = ArtifactLocation("memory://diffquant-tests/prefix")
    calls: list[str] = []
    monkeypatch.setattr(location.fs, "makedirs", lambda path, exist_ok=False: calls.append(path))
    location.make()
    assert calls == [location.root]  # memory:// has directories
    location.object_store = True  # as for s3://, gs://, az://: creating the "directory" would create a bucket
    location.make()
    assert calls == [location.root]


def test_checkpoint_output_must_be_local(calib_factory, tmp_path: Path) -> None:
    refused = CliRunner().invoke(main, ["quantize", "--calib", str(calib_factory(**TINY)), "--recipe", "int8_w8a8", "--out", "s3://bucket/q"])
    assert refused.exit_code == 2 and "--out s3://bucket/q is a store URL" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not Path("s3:").exists()
