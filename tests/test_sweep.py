"""`diffquant sweep` over every recipe on tiny-sdxl, and `diffquant eval` on one of its checkpoints.

One sweep (every shipped recipe plus one recipe file that cannot quantize, 1 prompt x 1 seed at 2
steps) runs once for the module through the CLI; the tests read what it wrote.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from diffquant import paths
from diffquant.cli import main
from diffquant.eval.plots import image_grid, layer_sqnr_plot
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.recipes import available_recipes
from diffquant.stages.evaluate import EvalPrompts

EVAL_ARGS = ["--eval-prompts", "1", "--seeds", "0", "--steps", "2", "--device", "cpu"]
BROKEN_RECIPE = """\
name: broken_group_size
description: a group larger than every layer, so every layer is skipped and quantize raises.
global:
  weight: {dtype: int4, granularity: per_group, group_size: 1048576, symmetric: true, observer: min_max}
"""
FIGURES = ("output_sqnr_db", "median_layer_output_sqnr_db", "worst_layer_output_sqnr_db", "psnr_db", "ssim")


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def calib(calib_factory, tmp_path_factory) -> Path:
    """A private copy of the shared artifact, with an empty statistics cache."""
    copy = tmp_path_factory.mktemp("sweep") / "calib"
    shutil.copytree(calib_factory("tiny-sdxl", num_prompts=3, steps=2), copy, ignore=shutil.ignore_patterns("stats"))
    return copy


@pytest.fixture(scope="module")
def swept(calib, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sweep-out")
    broken = work / "broken.yaml"
    broken.write_text(BROKEN_RECIPE)
    out = work / "sweep"
    output = run_cli("sweep", "--calib", str(calib), "--recipes", f"all,{broken}", "--out", str(out), *EVAL_ARGS)
    board = json.loads((out / "leaderboard.json").read_text())
    return {"out": out, "output": output, "board": board, "rows": {row["recipe"]: row for row in board["rows"]}}


def test_sweep_writes_every_output_with_one_row_per_recipe(swept):
    out = swept["out"]
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "grid.png", "layers.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".*.tmp"))
    assert set(swept["rows"]) == {*available_recipes(), "broken_group_size"}
    for name in available_recipes():
        row = swept["rows"][name]
        assert row["status"] == "ok", row["error"]
        assert (out / "checkpoints" / name / "quant_manifest.json").is_file()
        assert (out / "images" / name / "0-seed0.png").is_file()
        assert math.isfinite(row["output_sqnr_db"]) and math.isfinite(row["psnr_db"]) and 0.0 < row["ssim"] <= 1.0
        assert row["worst_layer_output_sqnr_db"] <= row["median_layer_output_sqnr_db"]
        assert row["quantize_seconds"] > 0
    assert (out / "images" / "_reference" / "0-seed0.png").is_file()
    # The summary table ends the output, then every default used and the command that repeats the run.
    assert "int8_weight_only" in swept["output"] and "held-out samples" in swept["output"]
    assert "pipeline kwargs" in swept["output"] and "repeat with: diffquant sweep --calib" in swept["output"]


def test_int8_recipes_beat_their_4bit_counterparts(swept):
    rows = swept["rows"]
    assert rows["int8_w8a8"]["output_sqnr_db"] > rows["w4a4"]["output_sqnr_db"]
    assert rows["int8_weight_only"]["output_sqnr_db"] > rows["w4a16"]["output_sqnr_db"]
    assert rows["int8_weight_only"]["psnr_db"] > rows["w4a4"]["psnr_db"]
    assert rows["int8_weight_only"]["ssim"] > rows["w4a4"]["ssim"]


def quantized_weight_ratio(checkpoint: Path) -> float:
    """Bytes of the quantized layers' stored tensors (codes and scales) / their weights in fp16."""
    manifest = json.loads((checkpoint / "quant_manifest.json").read_text())
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        stored = sum(_nbytes(handle, name) for layer in manifest["layers"] for name in layer["tensors"].values())
    return stored / sum(math.prod(layer["shape"]) * 2 for layer in manifest["layers"])


def _nbytes(handle, name: str) -> int:
    tensor = handle.get_tensor(name)
    return tensor.numel() * tensor.element_size()


def test_checkpoint_sizes_are_in_the_expected_ratios(swept):
    rows = swept["rows"]
    ratio = {name: quantized_weight_ratio(Path(row["checkpoint"])) for name, row in rows.items() if row["status"] == "ok"}
    for int8 in ("int8_w8a8", "int8_weight_only", "fp8"):
        # The tiny model is float32, twice fp16_bytes: the int8 checkpoint is smaller than even fp16.
        assert rows[int8]["checkpoint_bytes"] < rows[int8]["fp16_bytes"]
        assert ratio[int8] == pytest.approx(0.5, abs=0.01)  # one byte per weight, one scale per tensor
        for four_bit in ("w4a4", "w4a16", "mxfp4", "nvfp4"):
            assert rows[four_bit]["checkpoint_bytes"] < rows[int8]["checkpoint_bytes"]
    for four_bit in ("w4a4", "w4a16", "mxfp4", "nvfp4", "svdquant_w4a4"):
        # Half a byte per weight, plus a scale per group of 64 (int4), 32 (mxfp4) or 16 (nvfp4).
        assert 0.25 < ratio[four_bit] < 0.3
    for row in rows.values():
        if row["status"] == "ok":
            assert row["ratio_vs_fp16"] == row["checkpoint_bytes"] / row["fp16_bytes"]
            assert row["checkpoint_bytes"] == (swept["out"] / "checkpoints" / row["recipe"] / "model.safetensors").stat().st_size


def test_leaderboard_csv_json_and_markdown_agree(swept):
    board, out = swept["board"], swept["out"]
    with open(out / "leaderboard.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["recipe"] for r in csv_rows] == [r["recipe"] for r in board["rows"]]
    md_lines = [line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in md_lines[0].strip("|").split("|")]
    md_rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in md_lines[1:]]
    assert [r["recipe"] for r in md_rows] == [r["recipe"] for r in board["rows"]]
    for row, from_csv, from_md in zip(board["rows"], csv_rows, md_rows):
        for column in board["columns"]:
            value = row[column]
            if value is None:
                computed = row["ssim"] is not None if column == "psnr_db" else row["holdout_samples"] is not None
                assert from_csv[column] == ("inf" if computed and column.endswith("_db") else "")
            elif isinstance(value, float):
                assert float(from_csv[column]) == value, column  # repr reads back bit-exact
            else:
                assert from_csv[column] == str(value), column
        if row["status"] != "failed":
            assert from_md["output SQNR dB"] == f"{row['output_sqnr_db']:.2f}"
            assert from_md["PSNR dB"] == f"{row['psnr_db']:.2f}"
            assert from_md["SSIM"] == f"{row['ssim']:.4f}"
            assert from_md["bytes"] == f"{row['checkpoint_bytes']:,}"


def test_leaderboard_is_sorted_by_output_sqnr_with_failures_last(swept):
    rows = swept["board"]["rows"]
    ok = [r["output_sqnr_db"] for r in rows if r["status"] != "failed"]
    assert ok == sorted(ok, reverse=True)
    assert rows[-1]["status"] == "failed"


def test_failing_recipe_is_reported_and_the_sweep_goes_on(swept):
    row = swept["rows"]["broken_group_size"]
    assert row["status"] == "failed"
    assert row["error"].startswith("ConfigError: recipe broken_group_size matches no Linear or Conv2d layer")
    assert "broken_group_size" in (swept["out"] / "leaderboard.md").read_text().split("## Failed recipes")[1]
    assert "Traceback" in (swept["out"] / "errors" / "broken_group_size.txt").read_text()
    assert "failed: broken_group_size: ConfigError" in swept["output"]


def test_grid_has_the_reference_row_then_one_row_per_recipe(swept, tmp_path):
    rows = swept["board"]["rows"]
    grid = Image.open(swept["out"] / "grid.png")
    reference = Image.open(swept["out"] / "images" / "_reference" / "0-seed0.png")
    assert reference.size == (64, 64)  # tiny-sdxl's preset generates at 64 px
    labels = EvalPrompts.build(num_prompts=1, seeds=(0,)).labels()
    # The same layout with len(rows) + 1 rows of the same image size gives the expected pixel size.
    blank = Image.new("RGB", reference.size)
    expected = Image.open(image_grid([(str(k), [blank]) for k in range(len(rows) + 1)], labels, tmp_path / "expected.png"))
    assert grid.size == expected.size
    one_row = Image.open(image_grid([("x", [blank])], labels, tmp_path / "one.png"))
    row_pitch = (grid.height - one_row.height) / len(rows)
    assert row_pitch == 3 * reference.height + 6  # 64 px images enlarged x3 to 192, 6 px gap


def test_layers_plot_draws_the_leaderboards_per_layer_figures_in_model_order(swept, tmp_path):
    evaluated = [row for row in swept["board"]["rows"] if row.get("layers")]
    assert {row["recipe"] for row in evaluated} == set(available_recipes())  # the broken recipe has no figures
    names = {entry["name"] for row in evaluated for entry in row["layers"]}
    order = [name for name, _ in load_submodule(resolve_model("tiny-sdxl")).named_modules() if name in names]
    assert len(order) == len(names) > 1
    series = {}
    for row in evaluated:
        by_name = {entry["name"]: entry["output_sqnr_db"] for entry in row["layers"]}
        series[row["recipe"]] = [math.nan if n not in by_name else math.inf if by_name[n] is None else by_name[n] for n in order]
    expected = layer_sqnr_plot(series, order, tmp_path / "expected.png", "tiny-sdxl unet: per-layer output SQNR, held-out samples")
    with Image.open(swept["out"] / "layers.png") as got, Image.open(expected) as want:
        assert got.size == (1200, 600) and got.mode == want.mode
        assert got.tobytes() == want.tobytes()


def test_stats_cache_makes_later_recipes_skip_the_calibration_pass(swept):
    in_order = [swept["rows"][name] for name in swept["board"]["settings"]["recipes"] if swept["rows"][name]["status"] == "ok"]
    seen: set[str] = set()
    for row in in_order:
        report = row["stats_cache"]
        assert report["enabled"]
        assert not set(report["computed"]) & seen, f"{row['recipe']} recomputed {report['computed']}"
        seen |= set(report["computed"]) | set(report["hits"])
    assert swept["rows"]["fp8"]["stats_cache"]["computed"] == ["range"]  # first recipe with static inputs
    assert swept["rows"]["int8_w8a8"]["stats_cache"] == {"enabled": True, "hits": ["range"], "rejected": [], "computed": [], "store_error": None}


def test_eval_matches_the_sweeps_figures_exactly(swept):
    row = swept["rows"]["int8_w8a8"]
    record = json.loads(run_cli("eval", "--checkpoint", row["checkpoint"], "--num-prompts", "1", "--seeds", "0", "--steps", "2",
                                "--device", "cpu", "--json"))
    for key in (*FIGURES, "holdout_samples", "checkpoint_bytes", "ratio_vs_fp16", "weight_format", "activation_format"):
        assert record[key] == row[key], key
    assert record["layers"] == row["layers"]
    assert record["image_figures"] == row["image_figures"]
    assert record["holdout"]["status"] == "evaluated"


def test_eval_without_the_calibration_artifact_computes_image_metrics_only(swept, tmp_path):
    checkpoint = tmp_path / "moved"
    shutil.copytree(swept["out"] / "checkpoints" / "w4a16", checkpoint)
    manifest = json.loads((checkpoint / "quant_manifest.json").read_text())
    manifest["calibration"]["path"] = str(tmp_path / "gone")
    (checkpoint / "quant_manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(checkpoint), "--num-prompts", "1", "--seeds", "0", "--steps", "2",
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "cannot be opened" in result.stderr and "image metrics only" in result.stderr
    assert record["holdout"]["status"] == "skipped" and record["output_sqnr_db"] is None and "layers" not in record
    assert record["psnr_db"] == swept["rows"]["w4a16"]["psnr_db"]


def test_sweep_by_model_uses_the_newest_artifact_and_reuses_its_checkpoints(calib, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path / "artifacts")
    (tmp_path / "artifacts" / "calib").mkdir(parents=True)
    (tmp_path / "artifacts" / "calib" / "tiny").symlink_to(calib)
    args = ["sweep", "--model", "tiny-sdxl", "--recipes", "int8_weight_only", "--no-images", "--json"]
    first = json.loads(run_cli(*args))
    assert Path(first["out"]).parent == tmp_path / "artifacts" / "sweeps" and Path(first["out"]).name.startswith("tiny-sdxl-")
    assert first["settings"]["calib"] == str(tmp_path / "artifacts" / "calib" / "tiny")
    assert first["rows"][0]["status"] == "ok" and first["rows"][0]["psnr_db"] is None
    assert not (Path(first["out"]) / "grid.png").exists() and (Path(first["out"]) / "layers.png").is_file()
    with open(Path(first["out"]) / "leaderboard.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["psnr_db"] == row["ssim"] == "" and float(row["output_sqnr_db"]) == first["rows"][0]["output_sqnr_db"]
    second = json.loads(run_cli(*args))
    assert second["out"] == first["out"] and second["rows"][0]["status"] == "reused"
    assert second["rows"][0]["output_sqnr_db"] == first["rows"][0]["output_sqnr_db"]


def test_unknown_recipe_is_refused_before_anything_runs(calib, tmp_path):
    result = CliRunner().invoke(main, ["sweep", "--calib", str(calib), "--recipes", "int8_w8a8,no_such_recipe", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "unknown recipe 'no_such_recipe'" in result.output and not (tmp_path / "s").exists()


def test_calibration_column_names_the_calibration_free_baselines(swept):
    rows = swept["rows"]
    free = {name for name, row in rows.items() if row["status"] != "failed" and row["calibration"] == "free"}
    # Free: weight-only or dynamic-input recipes; needed: static input scales or SVDQuant activation smoothing (identity smoothing is free).
    assert free == {"fp8_dynamic", "gguf_q8_0", "int8_dynamic", "int8_weight_only", "mxfp4", "nvfp4", "w4a16", "w4a16_rtn", "w4a4", "svdquant_w4a4_nosmooth"}
    assert rows["fp8"]["calibration"] == rows["svdquant_w4a16"]["calibration"] == "needed"
    markdown = (swept["out"] / "leaderboard.md").read_text()
    assert "| calibration |" in markdown and "| fp8_dynamic | free |" in markdown


def test_calibration_need_reads_overrides() -> None:
    from diffquant.quant.recipe import recipe_from_dict
    from diffquant.stages.sweep import calibration_need

    base = {"name": "x", "global": {"weight": {"dtype": "int8", "granularity": "per_tensor"}}}
    assert calibration_need(recipe_from_dict(base)) == "free"
    static_attention = {**base, "names": {"*attn*": {"input": {"dtype": "int8", "granularity": "per_tensor", "dynamic": False}}}}
    assert calibration_need(recipe_from_dict(static_attention)) == "needed"
    dynamic = {**base, "layer_types": {"Linear": {"input": {"dtype": "fp8_e4m3", "granularity": "per_tensor", "dynamic": True}}}}
    assert calibration_need(recipe_from_dict(dynamic)) == "free"
