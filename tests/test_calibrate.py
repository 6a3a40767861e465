"""Stage one: capture, streaming shards, deduplication, resume, CLI and bad input."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils._pytree import tree_map_only

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, SampleSelection
from diffquant.cli import main
from diffquant.errors import ArtifactError, ConfigError
from diffquant.models.loading import get_target, load_pipeline
from diffquant.models.presets import resolve_model
from diffquant.models.tiny import TINY_FAMILIES
from tests.helpers.coco import write_coco_fixture
from diffquant.stages import calibrate as calibrate_stage
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from tests.helpers.samples import all_samples, same

HELPER = Path(__file__).parent / "helpers" / "calibrate_then_die.py"


def _all_samples(path: Path) -> list:
    return [sample for *_, sample in all_samples(path)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_tiny_family_calibrates_and_samples_run_the_model(family: str, calib_factory) -> None:
    out = calib_factory(f"tiny-{family}", num_prompts=2, steps=2)
    artifact = CalibrationArtifact(out)
    manifest = artifact.manifest
    assert manifest["status"] == "complete"
    assert len(artifact) == manifest["num_samples"] >= 4
    assert [r.step for r in artifact.records if r.prompt == 0] == list(range(len(artifact) // 2))
    pipe = load_pipeline(resolve_model(f"tiny-{family}"))
    target = get_target(pipe, resolve_model(f"tiny-{family}"))
    artifact.check_model(target)
    with torch.no_grad():
        out_tensor = target(**artifact.sample(0))
    first = out_tensor[0] if isinstance(out_tensor, tuple) else out_tensor.sample
    assert torch.isfinite(first.float()).all()


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_read_back_equals_captured_bit_for_bit(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the submodule was called with during a real `calibrate()` run (nested dicts, bf16 for
    tiny-flux) is what the reader returns; the run leaves the submodule without hooks."""
    preset = resolve_model(model)
    calls: list[dict] = []
    targets: list[torch.nn.Module] = []

    def load_and_record(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        target = get_target(pipe, preset)
        signature = inspect.signature(target.forward)

        def record(module, args, kwargs) -> None:
            arguments = signature.bind(*args, **kwargs).arguments
            calls.append(tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), dict(arguments)))

        targets.append(target)
        target.register_forward_pre_hook(record, with_kwargs=True)  # before calibrate's own capture hook
        return pipe

    monkeypatch.setattr(calibrate_stage, "load_pipeline", load_and_record)
    # A shard size of a few bytes closes a shard after every prompt.
    result = calibrate(CalibrationSettings(model=model, out=tmp_path, num_prompts=2, steps=2, device="cpu", shard_size_mb=1e-6),
                       show_progress=False)
    (target,) = targets
    assert len(target._forward_pre_hooks) == 1  # only the recorder: the capture hook is gone
    assert len(result.manifest["shards"]) == 2
    read = _all_samples(tmp_path)
    assert len(read) == len(calls) == 4
    for got, want in zip(read, calls):
        assert same(got, want)
    dtypes = {str(v.dtype) for s in read for v in s.values() if isinstance(v, torch.Tensor)}
    if model == "tiny-flux":
        assert "torch.bfloat16" in dtypes
    else:
        assert isinstance(read[0]["added_cond_kwargs"], dict) and read[0]["return_dict"] is False
    records = CalibrationArtifact(tmp_path).records
    assert [(r.prompt, r.step) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    timestep_name = "timestep" if "timestep" in calls[0] else "t"
    assert [r.timestep for r in records] == [float(call[timestep_name].reshape(-1)[0].float()) for call in calls]


def test_deduplication_stores_repeated_inputs_once(calib_factory) -> None:
    out = calib_factory("tiny-sdxl", num_prompts=3, steps=4)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # Per prompt: 4 latents and 4 timesteps change, text embeddings and time ids repeat.
    assert manifest["raw_bytes"] > 2 * sum(s["tensor_bytes"] for s in manifest["shards"])
    samples = _all_samples(out)
    assert torch.equal(samples[0]["encoder_hidden_states"], samples[3]["encoder_hidden_states"])
    assert not torch.equal(samples[0]["sample"], samples[1]["sample"])
    assert set(samples[1]) == set(samples[0])


def test_small_shards_split_at_prompt_boundaries(calib_factory) -> None:
    out = calib_factory("tiny-sdxl", num_prompts=3, steps=2, shard_size_mb=0.000001)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [s["num_prompts"] for s in manifest["shards"]] == [1, 1, 1]
    assert [s["first_sample"] for s in manifest["shards"]] == [0, 2, 4]
    assert same(_all_samples(out), _all_samples(calib_factory("tiny-sdxl", num_prompts=3, steps=2)))


@pytest.mark.parametrize(("when", "shard"), [("prompt", 2), ("publish", 2), ("publish", 0), ("published", 0), ("published", 2)])
def test_resume_after_kill_is_bit_identical(when: str, shard: int, tmp_path: Path, calib_factory) -> None:
    reference = calib_factory("tiny-sdxl", num_prompts=4, steps=2, shard_size_mb=0.000001)
    out = tmp_path / "killed"
    args = ["--model", "tiny-sdxl", "--num-prompts", "4", "--steps", "2", "--shard-size-mb", "0.000001", "--out", str(out)]
    killed = subprocess.run([sys.executable, str(HELPER), when, str(shard), "--", *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # The manifest exists from the start, so even a kill before the first shard is committed resumes.
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # The writer thread commits asynchronously: a kill as prompt 2 starts may find prompt 1 queued.
    assert manifest["status"] == "in_progress" and manifest["num_prompts_done"] in ((1, 2) if when == "prompt" else (shard,))
    if when == "publish":
        assert list(out.glob("*.partial")), "the kill should leave a half-written shard behind"
    if when == "published":
        assert (out / f"shard-{shard:06d}.safetensors").is_file(), "the kill should leave an uncommitted shard behind"
    result = CliRunner().invoke(main, ["calibrate", *args])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.partial"))
    assert same(_all_samples(out), _all_samples(reference))
    assert json.loads((out / MANIFEST_NAME).read_text())["shards"][2:] == json.loads((reference / MANIFEST_NAME).read_text())["shards"][2:]


def test_rerun_of_complete_run_changes_nothing(calib_factory) -> None:
    out = calib_factory("tiny-sdxl", num_prompts=3, steps=2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = CliRunner().invoke(main, ["calibrate", "--model", "tiny-sdxl", "--num-prompts", "3", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_different_command_into_used_directory_is_refused_unless_overwrite(calib_factory, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--out", str(out)]
    assert CliRunner().invoke(main, base).exit_code == 0
    refused = CliRunner().invoke(main, [*base[:-2], "--seed", "5", "--out", str(out)])
    assert refused.exit_code == 2
    assert "other settings (seed differ)" in refused.output and "--overwrite" in refused.output
    forced = CliRunner().invoke(main, [*base[:-2], "--seed", "5", "--overwrite", "--out", str(out)])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / MANIFEST_NAME).read_text())["settings"]["seed"] == 5


def test_inspect_json_reports_the_acceptance_run(tmp_path: Path) -> None:
    out = tmp_path / "check"
    run = CliRunner().invoke(main, ["calibrate", "--model", "tiny-sdxl", "--num-prompts", "4", "--steps", "3", "--out", str(out)])
    assert run.exit_code == 0, run.output
    result = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    summary = json.loads(result.output)
    assert summary["num_samples"] == 12 and summary["num_shards"] == 1
    assert summary["model"] == "tiny-sdxl" and summary["target"] == "unet"
    assert summary["raw_bytes"] > summary["total_bytes"] > 0
    assert summary["schema"]["added_cond_kwargs.time_ids"]["dtype"] == "float32"
    assert summary["schema"]["return_dict"] == {"const": False}
    table = CliRunner().invoke(main, ["inspect", str(out)])
    assert "encoder_hidden_states" in table.output and "stored / raw" in table.output


def test_coco_tsv_prompts_and_set_options(tmp_path: Path) -> None:
    tsv = write_coco_fixture(tmp_path / "captions_source.tsv", ["a red bus", "two dogs on a beach", "a bowl of fruit"])
    out = tmp_path / "coco"
    result = CliRunner().invoke(main, [
        "calibrate", "--model", "tiny-sd15", "--prompts", str(tsv), "--num-prompts", "2", "--shuffle", "--seed", "3",
        "--steps", "2", "--set", "guidance_scale=5.5", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["pipeline"]["kwargs"]["guidance_scale"] == 5.5
    assert len(manifest["prompts"]["list"]) == 2
    assert set(manifest["prompts"]["list"]) <= {"a red bus", "two dogs on a beach", "a bowl of fruit"}


def _run_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line[line.index("Error:"):] for line in result.output.strip().splitlines() if "Error:" in line]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    base = ["calibrate", "--steps", "1", "--out", out]
    assert "unknown model 'nope'" in _run_error([*base, "--model", "nope"]) and "tiny-sdxl" in _run_error([*base, "--model", "nope"])
    assert "does not exist" in _run_error([*base, "--model", "tiny-sd15", "--prompts", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    assert "no prompts" in _run_error([*base, "--model", "tiny-sd15", "--prompts", str(tmp_path / "empty.txt")]).lower()
    (tmp_path / "bad.tsv").write_text("id\ttext\n1\ta cat\n")
    assert "caption" in _run_error([*base, "--model", "tiny-sd15", "--prompts", str(tmp_path / "bad.tsv")])
    assert "--num-prompts must be >= 1" in _run_error([*base, "--model", "tiny-sd15", "--num-prompts", "0"])
    assert "has no submodule 'nothing'" in _run_error([*base, "--model", "tiny-sd15", "--target", "nothing"])
    assert "never called its 'vae'" in _run_error([*base, "--model", "tiny-sd15", "--target", "vae", "--num-prompts", "1"])
    assert "does not accept" in _run_error([*base, "--model", "tiny-sd15", "--num-prompts", "1", "--set", "bogus_option=1"])
    assert "--steps" in _run_error([*base, "--model", "tiny-sd15", "--set", "num_inference_steps=4"])
    assert not (tmp_path / "o" / MANIFEST_NAME).exists() or json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())["status"] != "complete"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "writable" in _run_error(["calibrate", "--model", "tiny-sd15", "--steps", "1", "--out", str(locked / "x")])


def test_unwritable_output_path_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "choose a writable --out" in _run_error(["calibrate", "--model", "tiny-sd15", "--steps", "1", "--out", str(blocker / "x")])


def test_reader_rejects_missing_and_truncated_shards(calib_factory, tmp_path: Path) -> None:
    import shutil

    source = calib_factory("tiny-sdxl", num_prompts=3, steps=2)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = next(broken.glob("shard-*.safetensors"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 10)
    with pytest.raises(ArtifactError, match=shard.name):
        CalibrationArtifact(broken)
    shard.unlink()
    with pytest.raises(ArtifactError, match=f"{shard.name} is missing"):
        CalibrationArtifact(broken)


def test_sample_selection(calib_factory) -> None:
    artifact = CalibrationArtifact(calib_factory("tiny-sdxl", num_prompts=3, steps=4))
    assert len(CalibrationDataset(artifact, SampleSelection(limit=5))) == 5
    assert CalibrationDataset(artifact, SampleSelection(every=4)).indices == [0, 4, 8]
    timesteps = sorted({r.timestep for r in artifact.records})
    high = CalibrationDataset(artifact, SampleSelection(timestep_min=timesteps[-1]))
    assert {artifact.records[i].step for i in high.indices} == {0}
    with pytest.raises(ConfigError, match="matches no sample"):
        CalibrationDataset(artifact, SampleSelection(timestep_min=1e9))


def test_timestep_aware_selection(calib_factory) -> None:
    artifact = CalibrationArtifact(calib_factory("tiny-sdxl", num_prompts=3, steps=4))
    records = artifact.records
    uniform = SampleSelection(uniform_steps=2).apply(records)
    assert sorted({records[i].step for i in uniform}) == [0, 3]
    assert len(uniform) == 6
    capped = SampleSelection(max_per_step=1).apply(records)
    assert [(records[i].prompt, records[i].step) for i in capped] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    both = SampleSelection(uniform_steps=3, max_per_step=2, every=1).apply(records)
    # steps 0..3, three of them evenly spaced: round(0), round(1.5) = 2 (half to even), round(3)
    assert [(records[i].prompt, records[i].step) for i in both] == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    with pytest.raises(ConfigError, match="uniform_steps=0"):
        SampleSelection(uniform_steps=0)


def test_local_pipeline_directory_as_model(tmp_path: Path) -> None:
    """A directory saved with save_pretrained works as --model (target found or given), and the
    artifact quantizes and generates without any preset."""
    from diffquant.models.tiny import tiny_pipeline_dir

    source = tiny_pipeline_dir("sd15")
    out = tmp_path / "local"
    run = CliRunner().invoke(main, ["calibrate", "--model", str(source), "--num-prompts", "2", "--steps", "2",
                                    "--set", "height=64", "--set", "width=64", "--out", str(out), "--json"])
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["model"]["source"] == str(source.resolve()) and manifest["model"]["target"] == "unet"
    assert manifest["model"]["pipeline_class"] == "DiffusionPipeline" and manifest["num_samples"] >= 4
    explicit = CliRunner().invoke(main, ["calibrate", "--model", str(source), "--target", "unet", "--num-prompts", "2",
                                         "--steps", "2", "--set", "height=64", "--set", "width=64", "--out", str(out)])
    assert explicit.exit_code == 0 and "nothing to do" in explicit.output
    checkpoint = tmp_path / "q"
    quantized = CliRunner().invoke(main, ["quantize", "--calib", str(out), "--recipe", "int8_weight_only", "--holdout", "1",
                                          "--out", str(checkpoint), "--json"])
    assert quantized.exit_code == 0, quantized.output
    image = tmp_path / "cat.png"
    generated = CliRunner().invoke(main, ["generate", "--checkpoint", str(checkpoint), "--prompt", "a cat", "--steps", "2", "--out", str(image)])
    assert generated.exit_code == 0, generated.output
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hub = CliRunner().invoke(main, ["calibrate", "--model", "someone/not-a-preset", "--steps", "1", "--out", str(tmp_path / "hub")])
    assert hub.exit_code == 2 and "--target" in hub.output


@pytest.mark.parametrize("placement", [["--offload", "model"], ["--device-map", "cpu"]])
def test_device_map_and_offload_reach_the_pipeline_and_change_no_sample(placement: list[str], calib_factory, tmp_path: Path) -> None:
    reference = calib_factory("tiny-sd15", num_prompts=2, steps=2)
    out = tmp_path / "placed"
    run = CliRunner().invoke(main, ["calibrate", "--model", "tiny-sd15", "--num-prompts", "2", "--steps", "2", "--device", "cpu",
                                    *placement, "--out", str(out)])
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    key = placement[0].lstrip("-").replace("-", "_")
    assert manifest["placement"][key] == placement[1]
    assert same(_all_samples(out), _all_samples(reference))
    both = CliRunner().invoke(main, ["calibrate", "--model", "tiny-sd15", "--steps", "1", "--offload", "model", "--device-map", "balanced",
                                     "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and "only one of them" in both.output
    sequential = CliRunner().invoke(main, ["calibrate", "--model", "tiny-sd15", "--steps", "1", "--device", "cpu", "--offload", "sequential",
                                           "--out", str(tmp_path / "sequential")])
    assert sequential.exit_code == 2 and "--device cuda" in sequential.output
