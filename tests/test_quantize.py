"""Stage two: excludes, quality report, held-out samples, observers, bad input, stats cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import diffquant.models.in_place as in_place
import diffquant.stages.quantize as quantize_stage
import diffquant.stages.statistics as statistics_part
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from diffquant.cli import main
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.quant.modules import QuantizedLayer
from diffquant.quant.spec import DTYPES, OBSERVERS
from diffquant.models.quantized import load_quantized_submodule
from diffquant.stages.quantize import QuantizeSettings, quantize

SDXL_PRESET_SKIPS = [
    {"name": "conv_in", "reason": "excluded by *conv_in*"},
    {"name": "time_embedding.linear_1", "reason": "excluded by *time_embedding*"},
    {"name": "time_embedding.linear_2", "reason": "excluded by *time_embedding*"},
    {"name": "add_embedding.linear_1", "reason": "excluded by *add_embedding*"},
    {"name": "add_embedding.linear_2", "reason": "excluded by *add_embedding*"},
    {"name": "conv_out", "reason": "excluded by *conv_out*"},
]


def fresh_calib(calib_factory, tmp_path: Path, model: str = "tiny-sdxl") -> Path:
    out = tmp_path / "calib"
    shutil.copytree(calib_factory(model, 3, 2), out, ignore=shutil.ignore_patterns("stats"))
    return out


# Excludes -----------------------------------------------------------------------------------

def test_excluded_layers_stay_bit_identical_to_the_original(quantize_factory) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    assert result.manifest["skipped"] == SDXL_PRESET_SKIPS
    original = load_submodule(resolve_model("tiny-sdxl"))
    generator = torch.Generator().manual_seed(0)
    for skip in SDXL_PRESET_SKIPS:
        kept, reference = result.model.get_submodule(skip["name"]), original.get_submodule(skip["name"])
        assert type(kept) is type(reference) and type(kept) in (torch.nn.Linear, torch.nn.Conv2d)
        assert torch.equal(kept.weight, reference.weight) and torch.equal(kept.bias, reference.bias)
        shape = (3, reference.in_features) if isinstance(reference, torch.nn.Linear) else (1, reference.in_channels, 8, 8)
        x = torch.randn(shape, generator=generator)
        with torch.inference_mode():
            assert torch.equal(kept(x), reference(x))


def test_recipe_exclude_adds_to_the_preset_excludes(tmp_path: Path, private_calib) -> None:
    recipe = tmp_path / "no_cross_attention.yaml"
    recipe.write_text(yaml.safe_dump({"name": "no_cross_attention", "global": {"weight": {"dtype": "int8"}}, "exclude": ["*attn2*"]}))
    result = quantize(QuantizeSettings(calib=private_calib("tiny-sdxl"), recipe=str(recipe), out=tmp_path / "q", device="cpu", holdout=2), show_progress=False)
    original = load_submodule(resolve_model("tiny-sdxl"))
    cross_attention = [n for n, m in original.named_modules() if "attn2" in n and isinstance(m, torch.nn.Linear)]
    assert len(cross_attention) >= 4
    skipped = result.manifest["skipped"]
    assert [s for s in skipped if s["name"] in {p["name"] for p in SDXL_PRESET_SKIPS}] == SDXL_PRESET_SKIPS
    assert sorted(s["name"] for s in skipped if s["reason"] == "excluded by *attn2*") == sorted(cross_attention)
    assert len(skipped) == len(SDXL_PRESET_SKIPS) + len(cross_attention)
    for name in cross_attention:
        assert type(result.model.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(result.model.get_submodule(name).weight, original.get_submodule(name).weight)
    assert not any("attn2" in layer["name"] for layer in result.manifest["layers"])


# Quality report -----------------------------------------------------------------------------

def test_quality_report_ranks_recipes_by_their_quantization_error(quantize_factory) -> None:
    sqnr = {recipe: quantize_factory("tiny-sdxl", recipe).manifest["quality"]["output_sqnr_db"]
            for recipe in ("int8_weight_only", "int8_w8a8", "w4a4")}
    # Measured on tiny-sdxl (3 prompts x 2 steps, 2 held out): 41.3, 28.8 and 9.3 dB.
    assert sqnr["int8_w8a8"] > 20.0
    assert sqnr["int8_w8a8"] > sqnr["w4a4"] + 10.0
    assert sqnr["int8_weight_only"] > sqnr["int8_w8a8"] + 5.0  # quantizing activations adds error
    for recipe in ("int8_w8a8", "w4a4"):
        quality = quantize_factory("tiny-sdxl", recipe).manifest["quality"]
        layers = [layer["quality"]["output_sqnr_db"] for layer in quantize_factory("tiny-sdxl", recipe).manifest["layers"]]
        assert all(value is not None and math.isfinite(value) for value in layers)
        assert quality["worst_layer_output_sqnr_db"] == min(layers)
        assert quality["median_layer_output_sqnr_db"] == sorted(layers)[len(layers) // 2]
        assert quality["holdout_samples"] == 2


def test_held_out_samples_are_never_seen_by_the_observers(private_calib, tmp_path: Path, monkeypatch) -> None:
    passes: list[list[int]] = []
    original_samples = quantize_stage._samples

    def recording(artifact, indices, settings):
        passes.append(list(indices))
        return original_samples(artifact, indices, settings)

    monkeypatch.setattr(quantize_stage, "_samples", recording)
    calib = private_calib("tiny-sdxl")
    result = quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=tmp_path / "q", device="cpu", holdout=2, use_stats_cache=False), show_progress=False)
    # 6 samples, 2 held out at int((i + 0.5) * 6 / 2) for i = 0, 1: indices 1 and 4.
    observed, *evaluated = passes
    assert observed == [0, 2, 3, 5]
    assert evaluated == [[1, 4], [1, 4]]  # per-layer figures, then the whole submodule
    records = CalibrationArtifact(calib).records
    assert result.manifest["calibration"]["holdout_sample_ids"] == [records[1].id, records[4].id]
    assert result.manifest["calibration"]["num_calibration_samples"] == 4
    assert not set(result.manifest["calibration"]["holdout_sample_ids"]) & {records[i].id for i in observed}


def test_percentile_observer_clips_inputs_no_wider_than_min_max(quantize_factory) -> None:
    min_max = quantize_factory("tiny-sdxl", "int8_w8a8").model
    percentile = quantize_factory("tiny-sdxl", "int8_w8a8_percentile").model
    names = [n for n, m in min_max.named_modules() if isinstance(m, QuantizedLayer)]
    pairs = [(min_max.get_submodule(n).input_scale, percentile.get_submodule(n).input_scale) for n in names]
    assert len(pairs) == 118
    assert any(not torch.equal(a, b) for a, b in pairs)
    # The clip each scale stands for: min_max's inputs take amax / 127.5 (half_span), the
    # percentile observer's its clip / 127; both scales are float32 quotients (2^-24 relative).
    assert all(bool(b * 127 <= a * 127.5 * (1 + 2.0**-22)) for a, b in pairs)


# Bad input ----------------------------------------------------------------------------------

def run_error(args: list[str]) -> str:
    """The one `Error: <what> — <fix>` line of a failed CLI call (exit code 2, no traceback)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line[line.index("Error:"):] for line in result.output.strip().splitlines() if "Error:" in line]
    assert len(lines) == 1, result.output
    assert " — " in lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def quantize_args(calib: Path, out: Path, recipe: str = "int8_w8a8", *extra: str, holdout: str = "2") -> list[str]:
    return ["quantize", "--calib", str(calib), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--holdout", holdout, *extra]


@pytest.mark.parametrize(("body", "expected"), [
    ("global: {weight: {dtype: int8}}\nbogus: 1\n",
     ["unknown key(s) bogus", "allowed keys are name, description, global, layer_types, names, exclude, exclude_mode, share_groups, algorithms, calibration"]),
    ("global: {weight: {dtype: int7}}\n", ["dtype 'int7' is not allowed", ", ".join(DTYPES)]),
    ("global: {weight: {dtype: int8}, input: {dtype: int8, observer: maxx}}\n", ["observer 'maxx' is not allowed", ", ".join(OBSERVERS)]),
], ids=["unknown-key", "unknown-dtype", "unknown-observer"])
def test_bad_recipe_is_a_one_line_error(body: str, expected: list[str], tmp_path: Path, private_calib) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\n" + body)
    message = run_error(quantize_args(private_calib("tiny-sdxl"), tmp_path / "out", str(recipe)))
    assert message.startswith("Error: recipe bad")
    for part in expected:
        assert part in message
    assert_nothing_written(tmp_path / "out")


def _edit_manifest(calib: Path, change) -> None:
    path = calib / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit", ["other-model", "config-hash"])
def test_calibration_of_another_model_is_refused(edit: str, calib_factory, tmp_path: Path) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    if edit == "other-model":
        _edit_manifest(calib, lambda m: m["model"].update(name="tiny-sd15", family="sd15", source="tiny://sd15", pipeline_class="StableDiffusionPipeline"))
    else:
        _edit_manifest(calib, lambda m: m["model"].update(target_config_sha256="0" * 64))
    message = run_error(quantize_args(calib, tmp_path / "out"))
    assert "the model given differs in its config" in message and str(calib) in message
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_shard_is_named_in_the_error(damage: str, calib_factory, tmp_path: Path) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    shard = next(calib.glob("shard-*.safetensors"))
    if damage == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as handle:
            handle.truncate(shard.stat().st_size - 10)
    message = run_error(quantize_args(calib, tmp_path / "out"))
    assert str(shard) in message and ("is missing" if damage == "missing" else "truncated") in message
    assert_nothing_written(tmp_path / "out")


def test_incomplete_calibration_is_refused(calib_factory, tmp_path: Path) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    _edit_manifest(calib, lambda m: m.update(status="in_progress", num_prompts_done=2))
    message = run_error(quantize_args(calib, tmp_path / "out"))
    assert "is incomplete (2 of 3 prompts)" in message and "diffquant calibrate" in message
    assert_nothing_written(tmp_path / "out")


def test_holdout_as_large_as_the_selection_is_refused(private_calib, tmp_path: Path) -> None:
    message = run_error(quantize_args(private_calib("tiny-sdxl"), tmp_path / "out", holdout="6"))
    assert "6 calibration samples selected, but 6 are held out" in message and "--holdout" in message
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("holdout", ["-1", "-4"])
def test_negative_holdout_is_refused_before_any_work(holdout: str, private_calib, tmp_path: Path) -> None:
    message = run_error(quantize_args(private_calib("tiny-sdxl"), tmp_path / "out", holdout=holdout))
    assert "holdout" in message and "0 to turn it off" in message


def test_existing_checkpoint_is_refused_unless_overwrite(private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "out"
    first = CliRunner().invoke(main, quantize_args(calib, out, "int8_weight_only", "--json"))
    assert first.exit_code == 0, first.output
    before = {name: (out / name).read_bytes() for name in (WEIGHTS_NAME, MANIFEST_NAME)}
    message = run_error(quantize_args(calib, out, "int8_w8a8"))
    assert f"{out} already holds a quantized checkpoint" in message and "--overwrite" in message
    assert {name: (out / name).read_bytes() for name in (WEIGHTS_NAME, MANIFEST_NAME)} == before
    forced = CliRunner().invoke(main, quantize_args(calib, out, "int8_w8a8", "--overwrite", "--json"))
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output.strip().splitlines()[-1])["recipe"] == "int8_w8a8"
    _, manifest = load_quantized_submodule(out)
    assert manifest.quantization_config["recipe"] == "int8_w8a8"
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_NAME, MANIFEST_NAME]


def test_failed_overwrite_run_keeps_the_previous_checkpoint(private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "out"
    assert CliRunner().invoke(main, quantize_args(calib, out, "int8_weight_only", "--json")).exit_code == 0
    message = run_error(quantize_args(calib, out, "int8_w8a8", "--overwrite", holdout="6"))
    assert "6 are held out" in message
    assert (out / WEIGHTS_NAME).is_file() and (out / MANIFEST_NAME).is_file()


# Stats cache --------------------------------------------------------------------------------

@pytest.fixture
def forward_passes(monkeypatch) -> list[dict[str, list[str]]]:
    """The requests of every statistics pass over the calibration data quantize() runs."""
    calls: list[dict[str, list[str]]] = []
    collect = statistics_part.collect_activation_stats

    def counting(model, requests, *args, **kwargs):
        calls.append({name: sorted(kinds) for name, kinds in requests.items()})
        return collect(model, requests, *args, **kwargs)

    monkeypatch.setattr(statistics_part, "collect_activation_stats", counting)
    return calls


def _run(calib: Path, out: Path, recipe: str = "int8_w8a8_percentile", **changes):
    return quantize(QuantizeSettings(calib=calib, recipe=recipe, out=out, device="cpu", holdout=2, **changes), show_progress=False)


def test_cached_statistics_skip_the_forward_pass_and_change_no_byte(calib_factory, tmp_path: Path, forward_passes) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    first = _run(calib, tmp_path / "min_max", "int8_w8a8")
    assert len(forward_passes) == 1 and {tuple(kinds) for kinds in forward_passes[0].values()} == {("range",)}
    assert first.manifest["stats_cache"] == {"enabled": True, "hits": [], "rejected": [], "computed": ["range"], "store_error": None}

    cached = _run(calib, tmp_path / "cached")
    assert len(forward_passes) == 1  # the percentile recipe needs only the cached input ranges
    assert cached.manifest["stats_cache"] == {"enabled": True, "hits": ["range"], "rejected": [], "computed": [], "store_error": None}

    uncached = _run(calib, tmp_path / "uncached", use_stats_cache=False)
    assert len(forward_passes) == 2
    assert uncached.manifest["stats_cache"]["enabled"] is False
    assert (tmp_path / "cached" / WEIGHTS_NAME).read_bytes() == (tmp_path / "uncached" / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_damaged_stats_file_is_recomputed(damage: str, calib_factory, tmp_path: Path, forward_passes) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    _run(calib, tmp_path / "first")
    (stats_file,) = (calib / "stats").glob("range-*.safetensors")
    if damage == "corrupt":
        data = bytearray(stats_file.read_bytes())
        data[-1] ^= 0x01
        stats_file.write_bytes(bytes(data))
    else:
        stats_file.unlink()
    again = _run(calib, tmp_path / "again")
    assert len(forward_passes) == 2
    assert again.manifest["stats_cache"] == {"enabled": True, "hits": [], "rejected": ["range"], "computed": ["range"], "store_error": None}
    assert (tmp_path / "first" / WEIGHTS_NAME).read_bytes() == (tmp_path / "again" / WEIGHTS_NAME).read_bytes()
    _run(calib, tmp_path / "third")
    assert len(forward_passes) == 2  # the recomputed entry replaced the damaged one


def test_changed_sample_selection_recomputes_statistics(calib_factory, tmp_path: Path, forward_passes) -> None:
    calib = fresh_calib(calib_factory, tmp_path)
    _run(calib, tmp_path / "all")
    limited = _run(calib, tmp_path / "limited", limit=5)
    assert len(forward_passes) == 2
    assert limited.manifest["stats_cache"]["computed"] == ["range"]
    assert limited.manifest["calibration"]["num_calibration_samples"] == 3
    _run(calib, tmp_path / "limited-again", limit=5)
    _run(calib, tmp_path / "all-again")
    assert len(forward_passes) == 2  # both selections stay cached side by side


def test_offloaded_submodule_quantizes_to_the_same_checkpoint(calib_factory, tmp_path: Path) -> None:
    """A submodule accelerate keeps on disk (meta weights, loaded by its hooks) is quantized layer
    by layer into the same tensors as the one loaded whole."""
    from safetensors.torch import load_file

    calib = fresh_calib(calib_factory, tmp_path)
    tensors = []
    for name, placement in (("whole", {}), ("offloaded", {"device_map": "auto", "max_memory": {"cpu": "600KB"},
                                                           "offload_folder": str(tmp_path / "offload")})):
        out = tmp_path / name
        result = quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=out, device="cpu", holdout=2, **placement), show_progress=False)
        if placement:
            assert getattr(result.model, "hf_device_map", None) == {"": "disk"}
        tensors.append(load_file(str(out / WEIGHTS_NAME)))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(t.dtype == tensors[1][k].dtype and torch.equal(t, tensors[1][k]) for k, t in tensors[0].items())


def test_unwritable_stats_cache_warns_and_quantizes_the_same(calib_factory, tmp_path: Path, monkeypatch) -> None:
    from diffquant.artifacts.location import ArtifactLocation

    calib = fresh_calib(calib_factory, tmp_path)
    original = ArtifactLocation.write_bytes

    def read_only(self: ArtifactLocation, name: str, data: bytes) -> None:
        if "stats" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        original(self, name, data)

    monkeypatch.setattr(ArtifactLocation, "write_bytes", read_only)
    with pytest.warns(UserWarning, match="cannot be written"):
        blocked = _run(calib, tmp_path / "blocked", "int8_w8a8")
    assert "Permission denied" in blocked.manifest["stats_cache"]["store_error"]
    assert not list((calib / "stats").glob("*.safetensors"))
    monkeypatch.setattr(ArtifactLocation, "write_bytes", original)
    _run(calib, tmp_path / "free", "int8_w8a8", use_stats_cache=False)
    assert (tmp_path / "blocked" / WEIGHTS_NAME).read_bytes() == (tmp_path / "free" / WEIGHTS_NAME).read_bytes()


def test_stage_two_releases_each_float_layer_as_its_quantized_replacement_goes_in(private_calib, tmp_path: Path, monkeypatch) -> None:
    """Quantization is in place: after each swap the float layer it replaced is garbage (no second
    model is ever held), and the layers still float at that moment are exactly the ones not reached."""
    import gc
    import weakref

    stage = quantize_stage

    originals: dict[str, weakref.ref] = {}
    alive_after_swap: list[tuple[str, list[str]]] = []
    real_swap = in_place.swap_layers
    real_plan = stage.plan_layers

    def plan_and_watch(model, *args, **kwargs):
        plans, skipped = real_plan(model, *args, **kwargs)
        modules = dict(model.named_modules())
        originals.update({plan.name: weakref.ref(modules[plan.name]) for plan in plans})
        return plans, skipped

    def swap_and_check(model, layers):
        real_swap(model, layers)
        gc.collect()
        alive_after_swap.append((next(iter(layers)), sorted(name for name, ref in originals.items() if ref() is not None)))

    monkeypatch.setattr(stage, "plan_layers", plan_and_watch)
    monkeypatch.setattr(in_place, "swap_layers", swap_and_check)
    quantize(QuantizeSettings(calib=private_calib("tiny-sdxl"), recipe="int8_weight_only", out=tmp_path / "q", device="cpu", holdout=1),
             show_progress=False)
    order = [name for name, _ in alive_after_swap]
    assert sorted(order) == sorted(originals) and len(order) > 50
    for i, (name, alive) in enumerate(alive_after_swap):
        # The layer just swapped out is still the loop's local until the next statement; every
        # earlier one is gone, every later one still float.
        assert alive == sorted(order[i:]), f"after swapping {name}"
    gc.collect()
    assert [name for name, ref in originals.items() if ref() is not None] == []


def test_phase_times_are_in_the_manifest_and_add_up_to_the_run(quantize_factory) -> None:
    timing = quantize_factory("tiny-sdxl", "int8_w8a8").manifest["timing"]
    phases = timing["phases_seconds"]
    assert set(phases) == {"load", "statistics", "quality_report", "weights", "write"}
    assert all(seconds >= 0 for seconds in phases.values())
    # Every phase but the write (timed by the writer, after the total) lies inside the total.
    inside = sum(seconds for name, seconds in phases.items() if name != "write")
    assert inside <= timing["quantize_seconds"] + 0.01


def test_phase_timer_moves_a_nested_block_from_one_phase_to_another(monkeypatch) -> None:
    import diffquant.eval.timing as stage

    # enter a, enter the pause of a, enter b, leave b, leave the pause, leave a
    clock = iter([0.0, 1.0, 1.0, 3.0, 3.0, 10.0])
    monkeypatch.setattr(stage.time, "perf_counter", lambda: next(clock))
    timer = stage.PhaseTimer(load=0.5)
    with timer("a"):
        with timer.pause("a"), timer("b"):
            pass
    assert timer.rounded() == {"load": 0.5, "a": 8.0, "b": 2.0}
