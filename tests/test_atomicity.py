"""--overwrite is atomic: a kill at any point of the publish step leaves a loadable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffquant.artifacts import replace
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, load_checkpoint_tensors, prepare_checkpoint_dir, read_checkpoint_manifest
from tests.helpers.reliability import run_cli

HELPERS = Path(__file__).parent / "helpers"


def _args(calib: Path, out: Path, recipe: str) -> list[str]:
    return ["--calib", str(calib), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--holdout", "2", "--json"]


def _recipe_of(out: Path) -> str:
    manifest = read_checkpoint_manifest(out)  # verifies the weights' sha256 too
    assert load_checkpoint_tensors(out)
    return manifest.quantization_config["recipe"]


@pytest.mark.parametrize("step", ["weights", "manifest", "switch", "cleanup"])
def test_kill_inside_the_publish_step_of_an_overwrite_leaves_a_loadable_checkpoint(step: str, private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "out"
    first = run_cli(["quantize", *_args(calib, out, "int8_weight_only")])
    assert first.exit_code == 0, first.output
    killed = subprocess.run([sys.executable, str(HELPERS / "quantize_then_die.py"), step, "--", *_args(calib, out, "int8_w8a8"), "--overwrite"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _recipe_of(out) == ("int8_w8a8" if step == "cleanup" else "int8_weight_only")
    again = run_cli(["quantize", *_args(calib, out, "int8_w8a8"), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert _recipe_of(out) == "int8_w8a8"
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_NAME, MANIFEST_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, old copy or lock left


def test_switch_without_exchange_interrupted_between_its_renames_restores_the_old_checkpoint(quantize_factory, tmp_path: Path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_weight_only").out, out)
    # The fallback's first rename happened, the kill came before the second one.
    os.rename(out, replace.old_dir(out))
    replace.staging_dir(out).mkdir()
    (replace.staging_dir(out) / WEIGHTS_NAME).write_bytes(b"half")
    prepare_checkpoint_dir(out, overwrite=True)
    assert _recipe_of(out) == "int8_weight_only"
    assert not replace.old_dir(out).exists() and not replace.staging_dir(out).exists()
    monkeypatch.setattr(replace, "_exchange", lambda a, b: False)
    new = replace.staging_dir(out)
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_w8a8").out, new)
    replace.switch_directory(new, out, {WEIGHTS_NAME, MANIFEST_NAME})
    assert _recipe_of(out) == "int8_w8a8" and not replace.old_dir(out).exists()


def test_kill_during_a_calibrate_overwrite_keeps_the_old_artifact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["--model", "tiny-sd15", "--num-prompts", "2", "--steps", "2", "--out", str(out)]
    assert run_cli(["calibrate", *base, "--json"]).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    killed = subprocess.run([sys.executable, str(HELPERS / "calibrate_then_die.py"), "prompt", "1", "--", *base, "--seed", "7", "--overwrite"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "manifest.json").read_bytes() == before
    assert len(CalibrationArtifact(out, verify=True)) == json.loads(before)["num_samples"]
    assert run_cli(["calibrate", *base, "--seed", "7", "--overwrite", "--json"]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_disk_full_while_writing_the_checkpoint_is_one_line_and_keeps_the_old_one(quantize_factory, private_calib, tmp_path: Path, monkeypatch) -> None:
    import errno
    import shutil

    from diffquant.artifacts import checkpoint

    out = tmp_path / "out"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_weight_only").out, out)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    result = run_cli(["quantize", *_args(private_calib("tiny-sdxl"), out, "int8_w8a8"), "--overwrite"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [result.output.strip()], result.output
    assert "No space left on device" in result.output and "previous checkpoint is kept" in result.output
    assert _recipe_of(out) == "int8_weight_only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_during_a_calibrate_overwrite_is_one_line_and_keeps_the_old_artifact(tmp_path: Path, monkeypatch) -> None:
    import errno

    from diffquant.artifacts import shard_formats

    out = tmp_path / "run"
    base = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--out", str(out), "--json"]
    assert run_cli(base).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_formats, "save_file", full)
    result = run_cli([*base, "--seed", "3", "--overwrite"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and "No space left on device" in lines[0], result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the half-built replacement is gone


class _Stopped(BaseException):
    """Raised at a chosen point, after the store's state there was saved: the state a kill leaves."""


def _snapshot(fs, root: str) -> tuple[dict[str, bytes], list[str]]:
    files = {path: fs.cat_file(path) for path in fs.find(root)}
    return files, [d for d in fs.pseudo_dirs if d.startswith(root)]


def _restore(fs, root: str, state: tuple[dict[str, bytes], list[str]]) -> None:
    if fs.exists(root):
        fs.rm(root, recursive=True)
    files, dirs = state
    for path, data in files.items():
        fs.pipe_file(path, data)
    fs.pseudo_dirs.extend(d for d in dirs if d not in fs.pseudo_dirs)


STORE_BASE = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "2", "--steps", "2", "--shard-size-mb", "0.000001", "--device", "cpu", "--json"]


@pytest.mark.parametrize("step", ["prompt", "manifest", "cleanup", "remove"])
def test_stop_at_any_point_of_a_store_overwrite_leaves_the_old_or_the_new_artifact(step: str, monkeypatch) -> None:
    import fsspec

    from diffquant.stages import capture

    fs = fsspec.filesystem("memory")
    root = f"/atomic-store-{step}-{os.getpid()}/calib"
    url = f"memory:/{root}"
    assert run_cli([*STORE_BASE, "--out", url]).exit_code == 0
    old = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert len(old["shards"]) == 2 and not any("/" in shard["file"] for shard in old["shards"])
    saved: list = []

    def stop_here() -> None:
        saved.append(_snapshot(fs, root))
        raise _Stopped

    if step == "prompt":  # the new artifact half built
        original = capture.SubmoduleInputCapture.start_prompt
        monkeypatch.setattr(capture.SubmoduleInputCapture, "start_prompt",
                            lambda self, i: stop_here() if i == 1 else original(self, i))
    else:  # manifest: built, not published; cleanup: published, nothing deleted; remove: one old file deleted
        calls = {"remove": 0}

        def step_hook(name: str) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name == step and (step != "remove" or calls[name] == 2):
                stop_here()

        monkeypatch.setattr(replace, "_publish_step", step_hook)
    with pytest.raises(_Stopped):
        from click.testing import CliRunner

        from diffquant.cli import main

        CliRunner().invoke(main, [*STORE_BASE, "--seed", "7", "--overwrite", "--out", url], catch_exceptions=False)
    monkeypatch.undo()
    _restore(fs, root, saved[0])  # exactly what a kill at that instant leaves in the store ...
    lease = json.loads(fs.cat_file(f"{root}/.diffquant.lock"))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    fs.pipe_file(f"{root}/.diffquant.lock", json.dumps({**lease, "pid": dead.pid}).encode())  # ... held by a process now dead

    published = step in ("cleanup", "remove")
    artifact = CalibrationArtifact(url, verify=True)  # every listed shard present with its sha256
    assert artifact.manifest["settings"]["seed"] == (7 if published else 0)
    assert len(artifact) == artifact.manifest["num_samples"] == old["num_samples"]
    if not published:
        assert fs.cat_file(f"{root}/manifest.json") == json.dumps(old, indent=2, sort_keys=True).encode() + b"\n"
    assert run_cli(["verify", url]).exit_code == 0

    again = run_cli([*STORE_BASE, "--seed", "7", "--overwrite", "--out", url])
    assert again.exit_code == 0, again.output
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert manifest["settings"]["seed"] == 7 and manifest["status"] == "complete"
    (generation,) = {shard["file"].split("/")[0] for shard in manifest["shards"]}
    assert replace.GENERATION.match(generation)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [generation, "manifest.json"]  # old files all gone
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{generation}", detail=False)) == sorted(s["file"].split("/")[1] for s in manifest["shards"])
    assert run_cli(["verify", url]).exit_code == 0
    samples = CalibrationArtifact(url, verify=True)
    assert len(samples) == manifest["num_samples"]
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_store_overwrite_of_an_overwrite_uses_a_new_generation_and_removes_the_old_one() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/atomic-generations-{os.getpid()}/calib"
    url = f"memory:/{root}"
    generations = []
    for seed in (0, 1, 2):
        assert run_cli([*STORE_BASE, "--seed", str(seed), "--overwrite", "--out", url]).exit_code == 0
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        generations.append({shard["file"].split("/")[0] for shard in manifest["shards"] if "/" in shard["file"]})
        assert manifest["settings"]["seed"] == seed and len(CalibrationArtifact(url, verify=True)) == manifest["num_samples"]
    assert generations[0] == set() and len(generations[1]) == len(generations[2]) == 1 and generations[1] != generations[2]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == sorted([*generations[2], "manifest.json"])
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_store_failure_during_an_overwrite_is_one_line_and_keeps_the_old_artifact(monkeypatch) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    root = f"/atomic-failing-store-{os.getpid()}/calib"
    url = f"memory:/{root}"
    assert run_cli([*STORE_BASE, "--out", url]).exit_code == 0
    before = {path: fs.cat_file(path) for path in fs.find(root)}
    original = MemoryFileSystem.pipe_file

    def refused(self, path, value, **kwargs):
        if "/generation-" in path and "/shard-" in path:
            raise ConnectionResetError("connection reset by peer")
        return original(self, path, value, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", refused)
    result = run_cli([*STORE_BASE, "--seed", "7", "--overwrite", "--out", url])
    monkeypatch.undo()
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "ConnectionResetError" in lines[0], result.output
    assert {path: fs.cat_file(path) for path in fs.find(root)} == before  # the old artifact, byte for byte; no generation left
    assert CalibrationArtifact(url, verify=True).manifest["settings"]["seed"] == 0
    fs.rm(root.rsplit("/", 1)[0], recursive=True)
