"""Data-parallel calibration: 2 ranks on the CPU (gloo) give exactly the single-process artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.quantize import QuantizeSettings, quantize
from tests.helpers.samples import all_samples as _samples
from tests.helpers.samples import same as _same

HELPER = Path(__file__).parent / "helpers" / "calibrate_then_die.py"
ARGS = ["--model", "tiny-sdxl", "--num-prompts", "5", "--steps", "2", "--shard-size-mb", "0.000001", "--device", "cpu"]
# Every rank computes with one intra-op thread, like the in-process reference (tests/conftest.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _diffquant(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffquant", *args], capture_output=True, text=True, env=ENV)


def test_two_ranks_give_the_single_process_samples_and_checkpoint(calib_factory, tmp_path: Path) -> None:
    reference = calib_factory("tiny-sdxl", num_prompts=5, steps=2, shard_size_mb=0.000001)
    out = tmp_path / "dp"
    run = _diffquant("calibrate", *ARGS, "--num-processes", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "complete" and manifest["settings"]["num_processes"] == 2
    assert [s["file"] for s in manifest["shards"]] == [
        "shard-r000-000000.safetensors", "shard-r000-000001.safetensors",
        "shard-r001-000000.safetensors", "shard-r001-000001.safetensors", "shard-r001-000002.safetensors",
    ]
    assert [s["first_sample"] for s in manifest["shards"]] == [0, 2, 4, 6, 8]
    assert not list(out.glob("manifest.rank*.json"))
    assert _same(_samples(out), _samples(reference))
    checkpoints = []
    for name, calib in (("single", reference), ("dp", out)):
        quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=tmp_path / f"q-{name}", device="cpu", holdout=2), show_progress=False)
        checkpoints.append(load_file(str(tmp_path / f"q-{name}" / "model.safetensors")))
    assert checkpoints[0].keys() == checkpoints[1].keys()
    assert all(torch.equal(t, checkpoints[1][k]) for k, t in checkpoints[0].items())


def test_a_rank_that_dies_leaves_the_run_resumable(calib_factory, tmp_path: Path) -> None:
    reference = calib_factory("tiny-sdxl", num_prompts=5, steps=2, shard_size_mb=0.000001)
    out = tmp_path / "dp"
    # Rank 1 owns prompts 2..4 and is killed as prompt 4 starts; the launcher then stops rank 0.
    killed = subprocess.run([*LAUNCH, str(HELPER), "prompt", "4", "--", *ARGS, "--out", str(out)],
                            capture_output=True, text=True, env=ENV)
    assert killed.returncode != 0
    assert not (out / MANIFEST_NAME).exists()
    rank1 = json.loads((out / "manifest.rank001.json").read_text())
    assert rank1["status"] == "in_progress" and rank1["num_prompts_done"] in (1, 2)
    run = _diffquant("calibrate", *ARGS, "--num-processes", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert _same(_samples(out), _samples(reference))
    again = _diffquant("calibrate", *ARGS, "--num-processes", "2", "--out", str(out))
    assert again.returncode == 0 and "nothing to do" in again.stderr


@pytest.mark.parametrize("where, step", [("local", "switch"), ("store", "manifest")])
def test_a_kill_in_the_publish_step_of_a_data_parallel_overwrite_leaves_a_loadable_artifact(where: str, step: str, tmp_path: Path) -> None:
    from diffquant.artifacts.calibration_reader import CalibrationArtifact
    from diffquant.artifacts.location import ArtifactLocation
    from diffquant.artifacts.replace import GENERATION
    from tests.helpers import shared_store

    shared_store.register()
    out = str(tmp_path / "dp") if where == "local" else f"{shared_store.PROTOCOL}://{tmp_path / 'dp'}"
    args = ["--model", "tiny-sd15", "--num-prompts", "2", "--steps", "2", "--shard-size-mb", "0.000001", "--device", "cpu", "--out", out]
    env = {**ENV, "PYTHONPATH": str(Path(__file__).parents[1])}

    def launch(when: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*LAUNCH, str(HELPER), when, step, "--", *args, *extra], capture_output=True, text=True, env=env)

    # The artifact replaced is a single-process one (quicker to make; --overwrite replaces any settings).
    calibrate(CalibrationSettings(model="tiny-sd15", out=out, num_prompts=2, steps=2, shard_size_mb=0.000001, device="cpu"), show_progress=False)
    killed = launch("step", "--seed", "7", "--overwrite")  # rank 0 is killed at `step`, the launcher stops rank 1
    assert killed.returncode != 0
    assert CalibrationArtifact(out, verify=True).manifest["settings"]["seed"] == 0
    again = launch("none", "--seed", "7", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    artifact = CalibrationArtifact(out, verify=True)
    assert artifact.manifest["settings"]["seed"] == 7 and artifact.manifest["settings"]["num_processes"] == 2
    assert len(artifact) == artifact.manifest["num_samples"] > 0
    names = ArtifactLocation(out).names()
    if where == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dp"]  # no staging or old copy left beside it
        assert names == sorted([MANIFEST_NAME, *(s["file"] for s in artifact.manifest["shards"])])
    else:
        (generation,) = {shard["file"].split("/")[0] for shard in artifact.manifest["shards"]}
        assert GENERATION.match(generation) and names == [generation, MANIFEST_NAME]
